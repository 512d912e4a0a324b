//! Little-endian accesses to guest RAM through `vm_memory::Bytes<GuestAddress>`.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::{DriverError, Result};

/// Guest RAM as the driver sees it: anything vm-memory can read and write bytes in.
pub trait GuestRam: Bytes<GuestAddress, E = GuestMemoryError> {}

impl<T: Bytes<GuestAddress, E = GuestMemoryError>> GuestRam for T {}

fn fault(addr: u64) -> DriverError {
    DriverError::Memory { addr }
}

/// Reads a little-endian u64.
pub fn read_u64<M: GuestRam>(mem: &M, addr: u64) -> Result<u64> {
    let mut buf = [0u8; 8];
    mem.read_slice(&mut buf, GuestAddress(addr))
        .map_err(|_| fault(addr))?;
    Ok(u64::from_le_bytes(buf))
}

/// Writes a little-endian u64.
pub fn write_u64<M: GuestRam>(mem: &M, addr: u64, value: u64) -> Result<()> {
    mem.write_slice(&value.to_le_bytes(), GuestAddress(addr))
        .map_err(|_| fault(addr))
}

/// Reads a little-endian u32.
pub fn read_u32<M: GuestRam>(mem: &M, addr: u64) -> Result<u32> {
    let mut buf = [0u8; 4];
    mem.read_slice(&mut buf, GuestAddress(addr))
        .map_err(|_| fault(addr))?;
    Ok(u32::from_le_bytes(buf))
}

/// Writes a little-endian u32.
pub fn write_u32<M: GuestRam>(mem: &M, addr: u64, value: u32) -> Result<()> {
    mem.write_slice(&value.to_le_bytes(), GuestAddress(addr))
        .map_err(|_| fault(addr))
}

/// Reads `N` consecutive little-endian qwords.
pub fn read_qwords<M: GuestRam, const N: usize>(mem: &M, addr: u64) -> Result<[u64; N]> {
    let mut out = [0u64; N];
    let mut at = addr;
    for word in &mut out {
        *word = read_u64(mem, at)?;
        at = at.checked_add(8).ok_or(DriverError::Overflow)?;
    }
    Ok(out)
}

/// Writes consecutive little-endian qwords (one access, as a CPU's cache-line copy would).
pub fn write_qwords<M: GuestRam>(mem: &M, addr: u64, words: &[u64]) -> Result<()> {
    // Commands (2 words) and STEs and CDs (8) fit the stack buffer; anything longer goes in
    // chunks of 8 words.
    let mut at = addr;
    for chunk in words.chunks(8) {
        let mut buf = [0u8; 64];
        for (dst, word) in buf.chunks_exact_mut(8).zip(chunk) {
            dst.copy_from_slice(&word.to_le_bytes());
        }
        let len = chunk.len().saturating_mul(8);
        mem.write_slice(
            buf.get(..len).ok_or(DriverError::Overflow)?,
            GuestAddress(at),
        )
        .map_err(|_| fault(at))?;
        at = at.checked_add(len as u64).ok_or(DriverError::Overflow)?;
    }
    Ok(())
}

/// Fills `len` bytes with `byte`.
pub fn fill<M: GuestRam>(mem: &M, addr: u64, len: u64, byte: u8) -> Result<()> {
    let chunk = [byte; 4096];
    let mut at = addr;
    let end = addr.checked_add(len).ok_or(DriverError::Overflow)?;
    while at < end {
        let n = (end.wrapping_sub(at)).min(4096);
        let slice = chunk
            .get(..usize::try_from(n).map_err(|_| DriverError::Overflow)?)
            .ok_or(DriverError::Overflow)?;
        mem.write_slice(slice, GuestAddress(at))
            .map_err(|_| fault(at))?;
        at = at.wrapping_add(n);
    }
    Ok(())
}
