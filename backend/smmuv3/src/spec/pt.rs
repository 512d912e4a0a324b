//! Translation table descriptors: the VMSAv8-64 long-descriptor format (Arm ARM D8.3) as an
//! SMMUv3 walks it for stage 1 (CD.AA64 = 1) and stage 2 (STE.S2AA64 = 1).
//!
//! Descriptors are 64-bit, little-endian unless CD.ENDI/STE.S2ENDI. Bits \[1:0\] give the
//! type: 0bx0 invalid, 0b01 a block at levels 0-2 (reserved, so invalid, at level 3), 0b11 a
//! table at levels 0-2 and a page at level 3. Each constant is a mask of its field in the
//! descriptor; leaf (block and page) attribute bits are meaningless in a table descriptor and
//! the table attribute bits \[62:59\] are meaningless (software-defined) in a leaf.
//!
//! Only the fields the walker uses are named: memory attributes, shareability, the contiguous
//! hint and DBM are not modelled. Output addresses are 48 bits at most (no FEAT_LPA/LPA2).

/// log2 of a descriptor's size: descriptors are 8 bytes, and a table is one granule of them.
pub const DESC_SIZE_SHIFT: u32 = 3;

/// \[0\] Valid: the descriptor is valid (any descriptor).
pub const VALID: u64 = 1 << 0;
/// \[1\] Descriptor type: at levels 0-2, 1 = table and 0 = block; at level 3, 1 = page (0 is
/// reserved and treated as invalid).
pub const TABLE_OR_PAGE: u64 = 1 << 1;

/// \[6\] Stage-1 leaf AP\[1\]: unprivileged (EL0) accesses are allowed.
pub const AP_UNPRIV: u64 = 1 << 6;
/// \[7\] Stage-1 leaf AP\[2\]: read-only.
pub const AP_RDONLY: u64 = 1 << 7;
/// \[6\] Stage-2 leaf S2AP\[0\]: reads are allowed.
pub const S2AP_READ: u64 = 1 << 6;
/// \[7\] Stage-2 leaf S2AP\[1\]: writes are allowed.
pub const S2AP_WRITE: u64 = 1 << 7;
/// \[10\] AF: the Access flag, in stage-1 and stage-2 leaves.
pub const AF: u64 = 1 << 10;
/// \[11\] nG: not global, in stage-1 leaves: the entry is tagged with the ASID.
pub const NG: u64 = 1 << 11;

/// \[53\] Stage-1 leaf PXN: privileged execute-never.
pub const PXN: u64 = 1 << 53;
/// \[54\] Stage-1 leaf UXN: unprivileged execute-never.
pub const UXN: u64 = 1 << 54;
/// \[54\] Stage-2 leaf XN\[1\]: execute-never (at both levels when XN\[0\] is ignored, i.e.
/// without SMMU_IDR3.XNX / FEAT_XNX).
pub const S2_XN1: u64 = 1 << 54;
/// \[53\] Stage-2 leaf XN\[0\], with SMMU_IDR3.XNX (FEAT_XNX): XN\[1:0\] = 0b00 executable at
/// both levels, 0b01 not privileged (EL1), 0b10 at neither, 0b11 not unprivileged (EL0).
pub const S2_XN0: u64 = 1 << 53;

/// \[59\] Stage-1 table PXNTable: no privileged execution at any level below.
pub const PXN_TABLE: u64 = 1 << 59;
/// \[60\] Stage-1 table UXNTable (XNTable): no unprivileged execution at any level below.
pub const UXN_TABLE: u64 = 1 << 60;
/// \[61\] Stage-1 table APTable\[0\]: no unprivileged access at any level below.
pub const AP_TABLE_NO_UNPRIV: u64 = 1 << 61;
/// \[62\] Stage-1 table APTable\[1\]: no write access at any level below.
pub const AP_TABLE_RDONLY: u64 = 1 << 62;
/// \[62:59\] The hierarchical attributes a stage-1 table descriptor passes down: APTable\[1:0\],
/// UXNTable and PXNTable. Ignored when CD.HADx is set for the table's range.
pub const TABLE_ATTRS: u64 = PXN_TABLE | UXN_TABLE | AP_TABLE_NO_UNPRIV | AP_TABLE_RDONLY;

/// Width of the address field, from bit 0: descriptor addresses are bits \[47:n\].
pub const ADDR_BITS: u32 = 48;
/// \[47:n\] Output address (block, page) or next-level table address: bits \[47:0\] of the
/// descriptor, of which only those from n up are address bits, n being log2 of the block or
/// page size (leaf) or of the granule (table); bits below n hold other fields. FEAT_LPA and
/// FEAT_LPA2 put OA\[51:48\] elsewhere in the descriptor (not modelled: bits \[51:48\] are
/// ignored, and so are a 64K page's or table's bits \[15:12\]).
pub const ADDR_MASK: u64 = (1 << ADDR_BITS) - 1;
