//! Circular queue index arithmetic (SMMUv3 3.5): a PROD or CONS value holds an index in bits
//! \[log2size-1:0\] and a wrap flag in bit \[log2size\].

/// A queue's geometry: where it is and how many entries it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueGeometry {
    /// Address of entry 0.
    pub base: u64,
    /// log2 of the number of entries (0..=19).
    pub log2size: u8,
    /// Bytes per entry (16 for commands, 32 for events).
    pub entry_size: u64,
}

impl QueueGeometry {
    /// Mask of the index bits.
    fn index_mask(&self) -> u32 {
        (1u32 << self.log2size.min(31)).wrapping_sub(1)
    }

    /// Mask of index and wrap bits.
    pub fn pointer_mask(&self) -> u32 {
        (1u32 << self.log2size.min(30).saturating_add(1)).wrapping_sub(1)
    }

    /// The index of a PROD/CONS value.
    pub fn index(&self, pointer: u32) -> u32 {
        pointer & self.index_mask()
    }

    /// The wrap flag of a PROD/CONS value.
    pub fn wrap(&self, pointer: u32) -> bool {
        pointer & (1u32 << self.log2size.min(31)) != 0
    }

    /// No entries between `cons` and `prod`.
    pub fn is_empty(&self, prod: u32, cons: u32) -> bool {
        (prod & self.pointer_mask()) == (cons & self.pointer_mask())
    }

    /// Every entry between `cons` and `prod` is in use.
    pub fn is_full(&self, prod: u32, cons: u32) -> bool {
        self.index(prod) == self.index(cons) && self.wrap(prod) != self.wrap(cons)
    }

    /// `pointer` moved on by one entry, wrap flag toggling at the end; bits above the wrap flag
    /// are kept.
    pub fn increment(&self, pointer: u32) -> u32 {
        let mask = self.pointer_mask();
        (pointer & !mask) | (pointer.wrapping_add(1) & mask)
    }

    /// Guest address of the entry a PROD/CONS value points at.
    pub fn entry_address(&self, pointer: u32) -> Option<u64> {
        u64::from(self.index(pointer))
            .checked_mul(self.entry_size)
            .and_then(|offset| self.base.checked_add(offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(log2size: u8) -> QueueGeometry {
        QueueGeometry {
            base: 0x1000,
            log2size,
            entry_size: 16,
        }
    }

    /// The index math of the spec (3.5.1) and Linux's queue_{empty,full} (Q_IDX, Q_WRP).
    #[test]
    fn empty_full_and_wrap() {
        let g = q(2); // four entries
        assert!(g.is_empty(0, 0));
        assert!(!g.is_full(0, 0));
        let mut prod = 0;
        for _ in 0..4 {
            prod = g.increment(prod);
        }
        assert_eq!(prod, 0b100, "index 0 with the wrap flag set");
        assert!(g.is_full(prod, 0));
        assert!(!g.is_empty(prod, 0));
        let prod = g.increment(g.increment(g.increment(g.increment(prod))));
        assert_eq!(prod, 0, "wrap flag toggles back");
        assert!(g.is_empty(prod, 0));
    }

    #[test]
    fn increment_keeps_high_flag_bits() {
        let g = q(3);
        // CMDQ_CONS.ERR in [30:24] and EVENTQ_PROD.OVFLG in [31] survive.
        assert_eq!(g.increment(0x8100_000f), 0x8100_0000);
        assert_eq!(g.increment(0x0100_0006), 0x0100_0007);
    }

    #[test]
    fn entry_addresses_and_zero_sized_queue() {
        let g = q(3);
        assert_eq!(g.entry_address(0b1011), Some(0x1000 + 3 * 16));
        let one = q(0);
        assert_eq!(one.index(1), 0);
        assert!(one.is_full(1, 0));
        assert_eq!(one.increment(1), 0);
        let top = QueueGeometry {
            base: u64::MAX - 8,
            log2size: 19,
            entry_size: 32,
        };
        assert_eq!(top.entry_address(5), None);
    }
}
