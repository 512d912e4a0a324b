//! A bump allocator for guest RAM: the driver's `dma_alloc_coherent`.

use super::{DriverError, Result};

/// Hands out aligned, never-freed ranges of guest physical addresses in `[next, end)`.
#[derive(Debug, Clone)]
pub struct BumpAllocator {
    next: u64,
    end: u64,
}

impl BumpAllocator {
    /// An allocator of the guest physical range `[start, end)`.
    pub fn new(start: u64, end: u64) -> Self {
        Self { next: start, end }
    }

    /// `size` bytes aligned to `align` (a power of two; 0 and 1 mean unaligned).
    pub fn alloc(&mut self, size: u64, align: u64) -> Result<u64> {
        let align = align.max(1);
        if !align.is_power_of_two() {
            return Err(DriverError::InvalidArgument(
                "alignment is not a power of two",
            ));
        }
        let mask = align.wrapping_sub(1);
        let start = self
            .next
            .checked_add(mask)
            .ok_or(DriverError::OutOfMemory { size, align })?
            & !mask;
        let end = start
            .checked_add(size)
            .filter(|&e| e <= self.end)
            .ok_or(DriverError::OutOfMemory { size, align })?;
        self.next = end;
        Ok(start)
    }

    /// The next free address.
    pub fn next_free(&self) -> u64 {
        self.next
    }

    /// The end of the managed range.
    pub fn end(&self) -> u64 {
        self.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_allocations() {
        let mut a = BumpAllocator::new(0x1010, 0x10000);
        assert_eq!(a.alloc(0x10, 0x1000), Ok(0x2000));
        assert_eq!(a.alloc(8, 64), Ok(0x2040));
        assert_eq!(a.alloc(0x4000, 0x4000), Ok(0x4000));
        assert_eq!(a.next_free(), 0x8000);
        assert!(a.alloc(0x10000, 8).is_err());
        assert!(a.alloc(8, 3).is_err());
    }
}
