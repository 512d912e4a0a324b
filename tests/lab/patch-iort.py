#!/usr/bin/env python3
"""Set CANWBS on every PCI root-complex node of an ACPI IORT table.

usage: patch-iort.py IN.aml OUT.aml

QEMU's virt IORT gives the root complex memory_flags 0x3 (CCA|CPM); the kernel's
arm-smmu-v3-iommufd refuses VIOMMU_ALLOC (EOPNOTSUPP) unless the device is
cache-coherent with CANWBS (bit 2), since the emulated SMMU has no S2FWB. The
patched table is loaded by the kernel's ACPI table upgrade from the initrd
(CONFIG_ACPI_TABLE_UPGRADE), hence the OEM revision bump.
"""
import struct
import sys

IORT_NODE_PCI_ROOT_COMPLEX = 2
ACPI_IORT_MF_CANWBS = 0x4

t = bytearray(open(sys.argv[1], "rb").read())
if len(t) < 48 or t[:4] != b"IORT" or struct.unpack_from("<I", t, 4)[0] != len(t):
    sys.exit("patch-iort: input is not a complete IORT table")
count, off = struct.unpack_from("<II", t, 36)
patched = 0
for _ in range(count):
    typ, length = struct.unpack_from("<BH", t, off)
    if typ == IORT_NODE_PCI_ROOT_COMPLEX:
        t[off + 23] |= ACPI_IORT_MF_CANWBS   # header 16 + cache_coherency 4 + hints 1 + reserved 2
        patched += 1
    off += length
if not patched:
    sys.exit("patch-iort: no PCI root-complex node found")
struct.pack_into("<I", t, 24, struct.unpack_from("<I", t, 24)[0] + 1)  # OEM revision + 1
t[9] = 0
t[9] = (-sum(t)) & 0xFF                                                  # checksum
open(sys.argv[2], "wb").write(t)
print(f"patch-iort: CANWBS set on {patched} root-complex node(s)")
