//! Page tables in guest memory for the walker's tests, written the way Linux's io-pgtable-arm
//! writes them, with descriptor bits and level arithmetic defined here from the Arm ARM rather
//! than taken from the walker or [`crate::spec::pt`], so that the tests check one against the
//! other.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::walk::Granule;

// Descriptor bits as Linux's io-pgtable-arm writes them.
const PTE_VALID: u64 = 1 << 0;
pub(super) const PTE_TYPE_TABLE: u64 = PTE_VALID | (1 << 1);
pub(super) const PTE_TYPE_PAGE: u64 = PTE_VALID | (1 << 1);
pub(super) const PTE_TYPE_BLOCK: u64 = PTE_VALID;
const PTE_NS: u64 = 1 << 5;
pub(super) const PTE_AP_UNPRIV: u64 = 1 << 6;
pub(super) const PTE_AP_RDONLY: u64 = 1 << 7;
const PTE_SH_IS: u64 = 3 << 8;
pub(super) const PTE_AF: u64 = 1 << 10;
pub(super) const PTE_PXN: u64 = 1 << 53;
pub(super) const PTE_XN: u64 = 1 << 54;
pub(super) const PTE_S2AP_READ: u64 = 1 << 6;
pub(super) const PTE_S2AP_WRITE: u64 = 1 << 7;
pub(super) const PTE_PXNTABLE: u64 = 1 << 59;
pub(super) const PTE_UXNTABLE: u64 = 1 << 60;
pub(super) const PTE_APTABLE_NO_EL0: u64 = 1 << 61;
pub(super) const PTE_APTABLE_RDONLY: u64 = 1 << 62;
pub(super) const ADDR_MASK: u64 = (1 << 48) - 1;

const fn attrindx(index: u64) -> u64 {
    index << 2
}

pub(super) const fn s2_memattr(attr: u64) -> u64 {
    attr << 2
}

/// Stage-1 read/write/exec for everyone, as io-pgtable-arm maps IOMMU_READ | IOMMU_WRITE.
pub(super) const S1_RW: u64 = PTE_AF | PTE_SH_IS | PTE_NS | PTE_AP_UNPRIV | attrindx(1);
/// Stage-2 read/write/exec.
pub(super) const S2_RW: u64 = PTE_AF | PTE_SH_IS | PTE_S2AP_READ | PTE_S2AP_WRITE | s2_memattr(0xf);

const MEM_SIZE: usize = 64 << 20;

pub(super) fn mem() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

pub(super) fn page_shift(granule: Granule) -> u32 {
    match granule {
        Granule::G4K => 12,
        Granule::G16K => 14,
        Granule::G64K => 16,
    }
}

/// log2 of what a descriptor at `level` maps, straight from the Arm ARM's tables.
pub(super) fn level_shift(granule: Granule, level: u32) -> u32 {
    let ps = page_shift(granule);
    ps + (3 - level) * (ps - 3)
}

/// Stage-1 start level: 4 - ceil((in_bits - page_shift) / stride).
pub(super) fn s1_start_level(granule: Granule, in_bits: u32) -> u32 {
    let ps = page_shift(granule);
    4 - (in_bits - ps).div_ceil(ps - 3)
}

/// Page tables in guest memory, written the way io-pgtable-arm writes them. Table addresses
/// live in the tables' own address space (an IPA space for nested stage 1); `pa_offset` is
/// added to find them in guest memory.
pub(super) struct Tables<'m> {
    pub(super) mem: &'m GuestMemoryMmap<()>,
    granule: Granule,
    in_bits: u32,
    pub(super) start_level: u32,
    /// Start-level table (or concatenated tables).
    pub(super) root: u64,
    next_free: u64,
    pa_offset: u64,
}

impl<'m> Tables<'m> {
    pub(super) fn new(
        mem: &'m GuestMemoryMmap<()>,
        granule: Granule,
        in_bits: u32,
        start_level: u32,
        base: u64,
    ) -> Self {
        Self::new_at(mem, granule, in_bits, start_level, base, 0)
    }

    pub(super) fn new_at(
        mem: &'m GuestMemoryMmap<()>,
        granule: Granule,
        in_bits: u32,
        start_level: u32,
        base: u64,
        pa_offset: u64,
    ) -> Self {
        let mut tables = Tables {
            mem,
            granule,
            in_bits,
            start_level,
            root: 0,
            next_free: base,
            pa_offset,
        };
        let root_bytes = 8u64 << (in_bits - level_shift(granule, start_level));
        tables.root = tables.alloc(root_bytes.max(tables.page()));
        tables
    }

    /// Stage-1 tables for TxSZ `tsz` at `base`.
    pub(super) fn s1(mem: &'m GuestMemoryMmap<()>, granule: Granule, tsz: u8, base: u64) -> Self {
        let in_bits = 64 - u32::from(tsz);
        Self::new(
            mem,
            granule,
            in_bits,
            s1_start_level(granule, in_bits),
            base,
        )
    }

    fn page(&self) -> u64 {
        1 << page_shift(self.granule)
    }

    fn alloc(&mut self, bytes: u64) -> u64 {
        let addr = self.next_free.next_multiple_of(bytes);
        self.next_free = addr + bytes;
        addr
    }

    fn index(&self, addr: u64, level: u32) -> u64 {
        let shift = level_shift(self.granule, level);
        let bits = if level == self.start_level {
            self.in_bits - shift
        } else {
            page_shift(self.granule) - 3
        };
        (addr >> shift) & ((1 << bits) - 1)
    }

    fn read(&self, addr: u64) -> u64 {
        self.mem
            .read_obj::<u64>(GuestAddress(addr.wrapping_add(self.pa_offset)))
            .unwrap()
    }

    fn write(&self, addr: u64, desc: u64) {
        self.mem
            .write_obj(desc, GuestAddress(addr.wrapping_add(self.pa_offset)))
            .unwrap();
    }

    /// Address of the descriptor for `addr` at `level`, creating tables on the way.
    fn slot(&mut self, addr: u64, level: u32) -> u64 {
        let mut table = self.root;
        for walk_level in self.start_level..level {
            let slot = table + 8 * self.index(addr, walk_level);
            let mut desc = self.read(slot);
            if desc == 0 {
                let page = self.page();
                desc = self.alloc(page) | PTE_TYPE_TABLE;
                self.write(slot, desc);
            }
            table = desc & ADDR_MASK & !(self.page() - 1);
        }
        table + 8 * self.index(addr, level)
    }

    /// Maps the block or page containing `addr` at `level` to `out` with `attrs`.
    pub(super) fn map(&mut self, addr: u64, level: u32, out: u64, attrs: u64) {
        let kind = if level == 3 {
            PTE_TYPE_PAGE
        } else {
            PTE_TYPE_BLOCK
        };
        let slot = self.slot(addr, level);
        self.write(slot, out | attrs | kind);
    }

    /// Sets `bits` in the table descriptor at `level` on the way to `addr`.
    pub(super) fn set_table_bits(&mut self, addr: u64, level: u32, bits: u64) {
        let slot = self.slot(addr, level);
        let desc = self.read(slot);
        assert_eq!(desc & 3, PTE_TYPE_TABLE, "not a table descriptor");
        self.write(slot, desc | bits);
    }

    /// Replaces the descriptor at `level` on the way to `addr`.
    pub(super) fn set_desc(&mut self, addr: u64, level: u32, desc: u64) {
        let slot = self.slot(addr, level);
        self.write(slot, desc);
    }
}
