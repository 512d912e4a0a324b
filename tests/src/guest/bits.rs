//! Bit-field helpers in the style of Linux's `GENMASK_ULL`, `FIELD_PREP` and `FIELD_GET`.
//!
//! Every helper is total: shifts wrap instead of overflowing, so the constants below can be
//! evaluated at compile time and guest-controlled values never panic.

/// `GENMASK_ULL(hi, lo)`: bits `hi..=lo` set (`hi` and `lo` at most 63).
pub const fn genmask(hi: u32, lo: u32) -> u64 {
    u64::MAX.wrapping_shr(63u32.wrapping_sub(hi)) & u64::MAX.wrapping_shl(lo)
}

/// `GENMASK(hi, lo)` for 32-bit registers.
pub const fn genmask32(hi: u32, lo: u32) -> u32 {
    u32::MAX.wrapping_shr(31u32.wrapping_sub(hi)) & u32::MAX.wrapping_shl(lo)
}

/// `BIT_ULL(n)`.
pub const fn bit(n: u32) -> u64 {
    1u64.wrapping_shl(n)
}

/// `BIT(n)` for 32-bit registers.
pub const fn bit32(n: u32) -> u32 {
    1u32.wrapping_shl(n)
}

/// `FIELD_PREP(mask, value)`.
pub const fn prep(mask: u64, value: u64) -> u64 {
    value.wrapping_shl(mask.trailing_zeros()) & mask
}

/// `FIELD_GET(mask, reg)`.
pub const fn get(mask: u64, reg: u64) -> u64 {
    (reg & mask).wrapping_shr(mask.trailing_zeros())
}

/// `FIELD_PREP` for 32-bit registers.
pub const fn prep32(mask: u32, value: u32) -> u32 {
    value.wrapping_shl(mask.trailing_zeros()) & mask
}

/// `FIELD_GET` for 32-bit registers.
pub const fn get32(mask: u32, reg: u32) -> u32 {
    (reg & mask).wrapping_shr(mask.trailing_zeros())
}

/// `reg` with the field `mask` replaced by `value` (`u64p_replace_bits`).
pub const fn replace(reg: u64, mask: u64, value: u64) -> u64 {
    (reg & !mask) | prep(mask, value)
}

/// `2^n`, or `None` when it does not fit in 64 bits.
pub fn pow2(n: u32) -> Option<u64> {
    1u64.checked_shl(n)
}

/// The low `n` bits set (all 64 when `n >= 64`).
pub fn low_mask(n: u32) -> u64 {
    pow2(n).map_or(u64::MAX, |v| v.wrapping_sub(1))
}

/// `ilog2` of a power of two, `None` for anything else.
pub fn exact_log2(value: u64) -> Option<u32> {
    value.is_power_of_two().then(|| value.trailing_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_macros() {
        assert_eq!(genmask(51, 6), 0x000f_ffff_ffff_ffc0);
        assert_eq!(genmask(63, 0), u64::MAX);
        assert_eq!(genmask(0, 0), 1);
        assert_eq!(genmask32(30, 24), 0x7f00_0000);
        assert_eq!(prep(genmask(3, 1), 5), 0b1010);
        assert_eq!(get(genmask(63, 59), 0xf800_0000_0000_0000), 31);
        assert_eq!(replace(0xffff, genmask(7, 4), 0), 0xff0f);
        assert_eq!(low_mask(64), u64::MAX);
        assert_eq!(exact_log2(0x1000), Some(12));
        assert_eq!(exact_log2(0x1800), None);
    }
}
