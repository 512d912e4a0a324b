//! Queue index arithmetic as Linux's `arm_smmu_ll_queue` helpers do it (`Q_IDX`, `Q_WRP`,
//! `Q_OVF`, `queue_full`, `queue_empty`, `queue_has_space`, `queue_consumed`, `queue_inc_*`).

use super::bits::prep;
use super::regs::{Q_BASE_ADDR_MASK, Q_BASE_LOG2SIZE, Q_BASE_RWA, Q_OVERFLOW_FLAG};

/// A queue of `2^shift` entries (`max_n_shift`), with producer and consumer values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlQueue {
    /// log2 of the number of entries.
    pub shift: u8,
    /// PROD: index, wrap bit and (event queue) overflow flag.
    pub prod: u32,
    /// CONS: index, wrap bit and (event queue) overflow-acknowledge flag.
    pub cons: u32,
}

impl LlQueue {
    /// An empty queue of `2^shift` entries.
    pub fn new(shift: u8) -> Self {
        Self {
            shift,
            prod: 0,
            cons: 0,
        }
    }

    fn index_mask(&self) -> u32 {
        1u32.checked_shl(u32::from(self.shift))
            .map_or(u32::MAX, |v| v.wrapping_sub(1))
    }

    fn wrap_bit(&self) -> u32 {
        1u32.checked_shl(u32::from(self.shift)).unwrap_or(0)
    }

    /// Number of entries.
    pub fn entries(&self) -> u32 {
        self.wrap_bit()
    }

    /// The *_BASE register value Linux writes for a queue at `base` (`q->q_base`).
    pub fn q_base(&self, base: u64) -> u64 {
        Q_BASE_RWA | (base & Q_BASE_ADDR_MASK) | prep(Q_BASE_LOG2SIZE, u64::from(self.shift))
    }

    /// Size in bytes of a queue of `ent_dwords`-qword entries.
    pub fn bytes(&self, ent_dwords: u64) -> u64 {
        u64::from(self.entries()).saturating_mul(ent_dwords.saturating_mul(8))
    }

    /// `Q_ENT`: the address of the slot PROD/CONS value `p` points at, for a queue of
    /// `ent_dwords`-qword entries at `base`.
    pub fn entry_addr(&self, base: u64, p: u32, ent_dwords: u64) -> Option<u64> {
        u64::from(self.idx(p))
            .checked_mul(ent_dwords.checked_mul(8)?)
            .and_then(|off| base.checked_add(off))
    }

    /// `Q_IDX`.
    pub fn idx(&self, p: u32) -> u32 {
        p & self.index_mask()
    }

    /// `Q_WRP`.
    pub fn wrp(&self, p: u32) -> u32 {
        p & self.wrap_bit()
    }

    /// `Q_OVF`.
    pub fn ovf(p: u32) -> u32 {
        p & Q_OVERFLOW_FLAG
    }

    /// `queue_full`.
    pub fn full(&self) -> bool {
        self.idx(self.prod) == self.idx(self.cons) && self.wrp(self.prod) != self.wrp(self.cons)
    }

    /// `queue_empty`.
    pub fn empty(&self) -> bool {
        self.idx(self.prod) == self.idx(self.cons) && self.wrp(self.prod) == self.wrp(self.cons)
    }

    /// `queue_has_space`: room for `n` more entries.
    pub fn has_space(&self, n: u32) -> bool {
        let prod = self.idx(self.prod);
        let cons = self.idx(self.cons);
        let space = if self.wrp(self.prod) == self.wrp(self.cons) {
            self.entries().wrapping_sub(prod.wrapping_sub(cons))
        } else {
            cons.wrapping_sub(prod)
        };
        space >= n
    }

    /// `queue_consumed`: CONS has moved past the entry at `prod`.
    pub fn consumed(&self, prod: u32) -> bool {
        (self.wrp(self.cons) == self.wrp(prod) && self.idx(self.cons) > self.idx(prod))
            || (self.wrp(self.cons) != self.wrp(prod) && self.idx(self.cons) <= self.idx(prod))
    }

    /// The value after `p`, keeping its overflow flag (`queue_inc_prod_n` with n = 1).
    pub fn inc(&self, p: u32) -> u32 {
        let next = (self.wrp(p) | self.idx(p)).wrapping_add(1);
        Self::ovf(p) | self.wrp(next) | self.idx(next)
    }

    /// The value `n` entries after `p` (`queue_inc_prod_n`).
    pub fn inc_n(&self, p: u32, n: u32) -> u32 {
        let next = (self.wrp(p) | self.idx(p)).wrapping_add(n);
        Self::ovf(p) | self.wrp(next) | self.idx(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_queue_math() {
        let mut q = LlQueue::new(2);
        assert!(q.empty() && q.has_space(4) && !q.has_space(5));
        q.prod = q.inc_n(q.prod, 4);
        assert_eq!(q.prod, 0b100);
        assert!(q.full() && !q.has_space(1));
        q.cons = 2;
        assert!(q.has_space(2) && !q.has_space(3));
        assert!(q.consumed(1) && !q.consumed(2));
        assert_eq!(q.inc(0x8000_0007), 0x8000_0000);
    }
}
