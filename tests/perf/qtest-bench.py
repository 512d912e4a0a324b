#!/usr/bin/env python3
"""Side-by-side benchmark of QEMU's in-process SMMUv3 and viommu-backend, driven by qtest.

Three configurations of the same `virt` machine, alternated round by round:

  A  QEMU's own SMMUv3:           -device arm-smmuv3,primary-bus=pcie.0
  B  viommu-backend, messages:    ... ,viommu=vu0 with -object viommu-user,...,shared-region=off
  C  viommu-backend, shared region (the default)

Every configuration gets the same guest RAM (a shared memfd), the same arm-smmuv3 on the
platform bus and the same iommu-testdev on pcie.0 (SID 0x18). B and C get a fresh
viommu-backend for every QEMU. QEMU runs with `-accel qtest`: this script is the "guest",
writing the SMMU's queues, stream table, context descriptor and page tables into guest RAM
over the qtest text protocol and poking registers with readl/writel.

Workloads, each measured many times per QEMU and reported as the median over rounds of the
per-round p50 (with the min-max of the per-round values):

  1. a register read (SMMU_CMDQ_CONS) through qtest readl, less a readl of guest RAM
     measured interleaved with it; also the series' qtest perf form (a 512-byte qtest read of
     the mirrored page-0 registers, 64 8-byte reads, less the same read of RAM, per read);
  2. CFGI_STE of SIDs no device has, 64 per CMDQ_PROD doorbell + CMD_SYNC (and 16 such groups
     per doorbell): doorbell to CONS == PROD, less a qtest writel + readl of RAM;
  3. iommu-testdev DMA through a stage-1 4K translation: to a never-used page (a miss
     everywhere: the pages around it are unmapped, so nothing prefetches it), to the same page
     again (a hit), and to a page just invalidated with TLBI_NH_VA + CMD_SYNC; the MMIO read
     that runs the DMA, less a readl of RAM.

Usage:
  QEMU=/path/to/qemu-system-aarch64 [VIOMMU_BACKEND=target/release/viommu-backend] \\
      python3 tests/perf/qtest-bench.py [--rounds N] [--scale F] [--keep-logs]

Exits 77 (skip) when QEMU is unset or cannot run the vIOMMU-user frontend, or the daemon
binary is missing. Python 3 standard library only.
"""

import argparse
import base64
import gc
import os
import shlex
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

SKIP = 77
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# ---- the virt machine --------------------------------------------------------------------
PLATFORM_BUS = 0x0C000000          # the first dynamic sysbus device lands at its base
ECAM_CANDIDATES = (0x4010000000, 0x3F000000)   # high ECAM (default), low ECAM
PCI_MMIO = 0x10000000              # where we put iommu-testdev's BAR0
RAM_BASE = 0x40000000
RAM_MB = 256
TESTDEV_DEVFN = 0x18               # -device iommu-testdev,addr=0x3 on bus 0: SID 0x18

# ---- guest memory layout (all in RAM) ------------------------------------------------------
RAM_PROBE = RAM_BASE + 0x1000      # the baseline readl/writel target
CMDQ_ADDR = RAM_BASE + 0x100000    # 2^12 commands of 16 bytes: 64 KiB, aligned to it
CMDQ_LOG2 = 12
EVTQ_ADDR = RAM_BASE + 0x120000    # 2^7 events of 32 bytes
EVTQ_LOG2 = 7
STRTAB_ADDR = RAM_BASE + 0x140000  # linear, 2^8 STEs of 64 bytes
STRTAB_LOG2 = 8
CD_ADDR = RAM_BASE + 0x150000
PT_L0 = RAM_BASE + 0x160000
PT_L1 = PT_L0 + 0x1000
PT_L2 = PT_L0 + 0x2000
PT_L3 = RAM_BASE + 0x170000        # NUM_L3 tables, one per 2 MiB of IOVA
NUM_L3 = 8
DMA_GPA = RAM_BASE + 0x1000000     # one 4 KiB page of output per mapped IOVA page
IOVA_BASE = 0x0000008080000000     # L0 index 1, L1 index 2, L2 index 0 + table number
ASID = 1
UNATTACHED_SID0 = 0x40             # CFGI_STE targets 0x40..0x7f: no device has them

# ---- SMMUv3 registers ------------------------------------------------------------------------
IDR0, IDR1 = 0x00, 0x04
CR0, CR0ACK, CR1, CR2 = 0x20, 0x24, 0x28, 0x2C
GERROR, GERRORN = 0x60, 0x64
STRTAB_BASE, STRTAB_BASE_CFG = 0x80, 0x88
CMDQ_BASE, CMDQ_PROD, CMDQ_CONS = 0x90, 0x98, 0x9C
EVENTQ_BASE = 0xA0
EVENTQ_PROD, EVENTQ_CONS = 0x100A8, 0x100AC
CR0_SMMUEN, CR0_EVENTQEN, CR0_CMDQEN = 1 << 0, 1 << 2, 1 << 3

# commands (opcode in bits 7:0 of the first doubleword)
OP_CFGI_STE, OP_CFGI_ALL = 0x03, 0x04
OP_TLBI_NH_VA, OP_TLBI_NSNH_ALL = 0x12, 0x30
OP_CMD_SYNC = 0x46

# iommu-testdev BAR0
ITD_TRIGGER, ITD_GVA_LO, ITD_GVA_HI, ITD_LEN = 0x00, 0x04, 0x08, 0x0C
ITD_RESULT, ITD_DBELL, ITD_ATTRS, ITD_GPA_LO, ITD_GPA_HI = 0x10, 0x14, 0x18, 0x1C, 0x20
ITD_ATTRS_NS = (1 << 1) | (1 << 3)     # space = non-secure, space valid
ITD_BUSY = 0xFFFFFFFE

CONFIGS = {
    "A": "in-process",
    "B": "messages",
    "C": "shared",
}


class BenchError(Exception):
    pass


def cmd_words(dw0, dw1=0):
    return struct.pack("<QQ", dw0, dw1)


def cfgi_ste(sid):
    return cmd_words(OP_CFGI_STE | (sid << 32), 1)        # Leaf = 1


def cmd_sync():
    return cmd_words(OP_CMD_SYNC)                         # CS = SIG_NONE: CONS moving is it


def tlbi_nh_va(asid, iova):
    return cmd_words(OP_TLBI_NH_VA | (asid << 48), (iova & ~0xFFF) | 1)   # Leaf = 1


# ---- qtest -----------------------------------------------------------------------------------

class Qtest:
    """The client side of QEMU's qtest line protocol, over the socket QEMU connected to."""

    def __init__(self, conn):
        self.conn = conn
        self.buf = bytearray()

    def raw(self, line):
        """Send one pre-encoded command line; return its OK reply without the 'OK'."""
        self.conn.sendall(line)
        buf = self.buf
        while True:
            i = buf.find(b"\n")
            while i < 0:
                chunk = self.conn.recv(1 << 16)
                if not chunk:
                    raise BenchError("QEMU closed the qtest connection (did it crash?)")
                buf += chunk
                i = buf.find(b"\n")
            reply = bytes(buf[:i])
            del buf[: i + 1]
            if reply.startswith(b"IRQ"):
                continue                                  # asynchronous, not ours
            if not reply.startswith(b"OK"):
                raise BenchError("qtest %r: %r" % (line.strip(), reply))
            return reply[3:]

    def readl(self, addr):
        return int(self.raw(b"readl 0x%x\n" % addr), 16)

    def readq(self, addr):
        return int(self.raw(b"readq 0x%x\n" % addr), 16)

    def writel(self, addr, val):
        self.raw(b"writel 0x%x 0x%x\n" % (addr, val))

    def writeq(self, addr, val):
        self.raw(b"writeq 0x%x 0x%x\n" % (addr, val))

    def memwrite(self, addr, data):
        if data:
            self.raw(b"b64write 0x%x 0x%x %s\n" % (addr, len(data), base64.b64encode(data)))

    def memread(self, addr, size):
        return base64.b64decode(self.raw(b"b64read 0x%x 0x%x\n" % (addr, size)))


# ---- one QEMU (and daemon) -------------------------------------------------------------------

class Instance:
    def __init__(self, cfg, args, workdir, tag, has_testdev):
        self.cfg = cfg
        self.qemu_bin = args.qemu
        self.backend_bin = args.backend
        self.backend_args = shlex.split(args.backend_args)
        self.vu_opts = args.vu_opts
        self.dir = workdir
        self.tag = tag
        self.has_testdev = has_testdev
        self.qemu = None
        self.daemon = None
        self.q = None
        self.listener = None
        self.cmdq_prod = 0
        self.notes = []

    # -- processes --

    def start(self):
        qsock = os.path.join(self.dir, "%s.qtest" % self.tag)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(qsock)
        self.listener.listen(1)
        self.listener.settimeout(30)
        args = [
            self.qemu_bin, "-accel", "qtest", "-qtest", "unix:" + qsock,
            "-qtest-log", os.environ.get("QTEST_LOG_FILE", "/dev/null"),
            "-display", "none", "-nodefaults", "-cpu", "max", "-m", "%dM" % RAM_MB,
            "-object", "memory-backend-memfd,id=mem,size=%dM,share=on" % RAM_MB,
            "-M", "virt,memory-backend=mem",
        ]
        smmu = "arm-smmuv3,primary-bus=pcie.0,id=smmuv3.0"
        if self.cfg in "BC":
            dsock = os.path.join(self.dir, "%s.vsmmu" % self.tag)
            self.daemon_log = os.path.join(self.dir, "%s.daemon.log" % self.tag)
            with open(self.daemon_log, "wb") as log:
                self.daemon = subprocess.Popen(
                    [self.backend_bin, "--socket-path", dsock] + self.backend_args, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 10
            while not os.path.exists(dsock):
                if self.daemon.poll() is not None:
                    raise BenchError("viommu-backend exited (%s) before listening; see %s"
                                     % (self.daemon.returncode, self.daemon_log))
                if time.monotonic() > deadline:
                    raise BenchError("viommu-backend did not create %s" % dsock)
                time.sleep(0.01)
            vu = "viommu-user,id=vu0,chardev=vsmmu0"
            if self.cfg == "B":
                vu += ",shared-region=off"
            if self.vu_opts:
                vu += "," + self.vu_opts
            args += ["-chardev", "socket,id=vsmmu0,path=" + dsock, "-object", vu]
            smmu += ",viommu=vu0"
        args += ["-device", smmu]
        if self.has_testdev:
            args += ["-device", "iommu-testdev,addr=0x%x" % (TESTDEV_DEVFN >> 3)]
        self.qemu_args = args
        self.qemu_log = os.path.join(self.dir, "%s.qemu.log" % self.tag)
        with open(self.qemu_log, "wb") as log:
            self.qemu = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        try:
            conn, _ = self.listener.accept()
        except socket.timeout:
            raise BenchError("QEMU did not connect to qtest; see %s" % self.qemu_log)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.q = Qtest(conn)

    def stop(self):
        if self.daemon and self.daemon.poll() is None:
            # SIGUSR1: one status line with the session's counters, into the log
            self.daemon.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
        if self.q:
            try:
                self.q.conn.close()
            except OSError:
                pass
        if self.listener:
            self.listener.close()
        for proc in (self.qemu, self.daemon):
            if proc is None:
                continue
            if proc is self.qemu and proc.poll() is not None:
                self.notes.append("%s: QEMU exited on its own (%s); see %s"
                                  % (self.tag, proc.returncode, self.qemu_log))
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    self.notes.append("%s: pid %d needed SIGKILL" % (self.tag, proc.pid))
        if self.daemon and self.daemon.returncode not in (0, -signal.SIGTERM):
            self.notes.append("%s: viommu-backend exited with %s"
                              % (self.tag, self.daemon.returncode))

    # -- the SMMU --

    def reg(self, off):
        return self.base + off

    def find_smmu(self):
        self.base = int(os.environ.get("SMMU_BASE", "0"), 0) or PLATFORM_BUS
        idr0 = self.q.readl(self.reg(IDR0))
        if idr0 in (0, 0xFFFFFFFF) or (idr0 >> 2) & 3 != 2:   # TTF: AArch64 tables
            raise BenchError("no SMMUv3 at 0x%x (IDR0 0x%x); set SMMU_BASE" % (self.base, idr0))
        idr1 = self.q.readl(self.reg(IDR1))
        self.cmdq_log2 = min(CMDQ_LOG2, (idr1 >> 21) & 0x1F)
        self.evtq_log2 = min(EVTQ_LOG2, (idr1 >> 16) & 0x1F)
        self.idr0, self.idr1 = idr0, idr1

    def wait_cr0ack(self, val):
        for _ in range(100000):
            if self.q.readl(self.reg(CR0ACK)) == val:
                return
        raise BenchError("CR0ACK never became 0x%x" % val)

    def setup_pci(self):
        for ecam in ECAM_CANDIDATES:
            if self.q.readl(ecam) & 0xFFFF == 0x1B36:         # the GPEX host bridge
                break
        else:
            raise BenchError("no PCIe ECAM found")
        cfg = ecam + (TESTDEV_DEVFN << 12)
        ids = self.q.readl(cfg)
        if ids != 0x00051B36:
            raise BenchError("iommu-testdev not at 00:%02x.%x (ID 0x%08x)"
                             % (TESTDEV_DEVFN >> 3, TESTDEV_DEVFN & 7, ids))
        self.q.writel(cfg + 0x10, PCI_MMIO)                  # BAR0
        self.q.writel(cfg + 0x04, 0x6)                       # memory space, bus master
        self.bar = PCI_MMIO
        if self.q.readl(self.bar + ITD_RESULT) != 0xFFFFFFFF:
            raise BenchError("iommu-testdev BAR0 does not answer at 0x%x" % self.bar)

    def build_tables(self):
        q = self.q
        # STE of the test device: valid, stage-1 translation, one CD (S1Fmt linear,
        # S1CDMax 0); S1CIR/S1COR WBRA, S1CSH inner shareable, SHCFG "use incoming".
        ste0 = 1 | (0b101 << 1) | (CD_ADDR & ((1 << 52) - (1 << 6)))
        ste1 = (1 << 2) | (1 << 4) | (3 << 6) | (1 << 44)
        ste = struct.pack("<8Q", ste0, ste1, 0, 0, 0, 0, 0, 0)
        q.memwrite(STRTAB_ADDR, bytes(64 << STRTAB_LOG2))    # every other STE invalid
        q.memwrite(STRTAB_ADDR + 64 * TESTDEV_DEVFN, ste)
        # CD: T0SZ 16 (48-bit IOVA), TG0 4K, IRGN0/ORGN0 WBWA, SH0 inner, EPD1, valid;
        # IPS 44 bits, AA64, R (record faults), A (abort), ASID; TTB0; MAIR0.
        cd0 = (16 | (0 << 6) | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 30) | (1 << 31)
               | (4 << 32) | (1 << 41) | (1 << 45) | (1 << 46) | (ASID << 48))
        cd = struct.pack("<8Q", cd0, PT_L0, 0, 0xFF, 0, 0, 0, 0)
        q.memwrite(CD_ADDR, cd)
        # 4-level 4K tables. Only even pages are mapped: a walk that looks at a neighbour
        # (the backend's prefetch, section 10.6) stops at once, so every page is a miss.
        table = 0x3
        page = 0x3 | (1 << 6) | (3 << 8) | (1 << 10)   # AP[1] EL0 RW, inner shareable, AF
        l0 = bytearray(4096)
        struct.pack_into("<Q", l0, 8 * ((IOVA_BASE >> 39) & 0x1FF), PT_L1 | table)
        l1 = bytearray(4096)
        struct.pack_into("<Q", l1, 8 * ((IOVA_BASE >> 30) & 0x1FF), PT_L2 | table)
        l2 = bytearray(4096)
        self.pages = []
        l3_all = bytearray(4096 * NUM_L3)
        n = 0
        for t in range(NUM_L3):
            iova_t = IOVA_BASE + (t << 21)
            struct.pack_into("<Q", l2, 8 * ((iova_t >> 21) & 0x1FF), (PT_L3 + 4096 * t) | table)
            for j in range(0, 512, 2):
                gpa = DMA_GPA + 4096 * n
                struct.pack_into("<Q", l3_all, 4096 * t + 8 * j, gpa | page)
                self.pages.append((iova_t + 4096 * j, gpa))
                n += 1
        q.memwrite(PT_L0, bytes(l0))
        q.memwrite(PT_L1, bytes(l1))
        q.memwrite(PT_L2, bytes(l2))
        q.memwrite(PT_L3, bytes(l3_all))
        # Touch every DMA target page now: a first write to a memfd page is a host page
        # fault of a few microseconds, which would land in the miss row of every column.
        q.raw(b"memset 0x%x 0x%x 0\n" % (DMA_GPA, 4096 * n))
        # Interleave the pages of the tables, so that consecutive samples are far apart.
        self.pages = [self.pages[(i % NUM_L3) * 256 + i // NUM_L3]
                      for i in range(len(self.pages))]
        self.next_page = 0

    def enable_smmu(self):
        q = self.q
        q.writel(self.reg(CR0), 0)
        self.wait_cr0ack(0)
        q.writel(self.reg(CR1), 0xD75)       # queues and tables: WB cacheable, inner shareable
        q.writel(self.reg(CR2), 0)
        q.memwrite(CMDQ_ADDR, bytes(16 << self.cmdq_log2))
        q.writeq(self.reg(CMDQ_BASE), CMDQ_ADDR | self.cmdq_log2)
        q.writel(self.reg(CMDQ_PROD), 0)
        q.writel(self.reg(CMDQ_CONS), 0)
        q.writeq(self.reg(EVENTQ_BASE), EVTQ_ADDR | self.evtq_log2)
        q.writel(self.reg(EVENTQ_PROD), 0)
        q.writel(self.reg(EVENTQ_CONS), 0)
        q.writel(self.reg(STRTAB_BASE_CFG), STRTAB_LOG2)     # FMT linear
        q.writeq(self.reg(STRTAB_BASE), STRTAB_ADDR)
        q.writel(self.reg(CR0), CR0_CMDQEN | CR0_EVENTQEN)
        self.wait_cr0ack(CR0_CMDQEN | CR0_EVENTQEN)
        self.cmdq_prod = 0
        self.run_commands(cmd_words(OP_CFGI_ALL, 31) + cmd_words(OP_TLBI_NSNH_ALL) + cmd_sync())
        on = CR0_SMMUEN | CR0_CMDQEN | CR0_EVENTQEN
        q.writel(self.reg(CR0), on)
        self.wait_cr0ack(on)

    def queue_commands(self, cmds):
        """Write commands at the producer index; returns the CMDQ_PROD value to publish."""
        size = 1 << self.cmdq_log2
        n = len(cmds) // 16
        if n >= size:
            raise BenchError("too many commands for the queue")
        idx = self.cmdq_prod % size
        first = min(n, size - idx)
        self.q.memwrite(CMDQ_ADDR + 16 * idx, cmds[: 16 * first])
        if first < n:
            self.q.memwrite(CMDQ_ADDR, cmds[16 * first:])
        self.cmdq_prod += n
        return self.cmdq_prod & ((size << 1) - 1)

    def wait_cons(self, prod):
        cons_cmd = b"readl 0x%x\n" % self.reg(CMDQ_CONS)
        mask = (2 << self.cmdq_log2) - 1
        polls = 0
        deadline = None
        while True:
            cons = int(self.q.raw(cons_cmd), 16)
            polls += 1
            if (cons >> 24) & 0x7F:
                raise BenchError("CMDQ_CONS.ERR 0x%x (CONS 0x%x)" % ((cons >> 24) & 0x7F, cons))
            if cons & mask == prod:
                return polls
            if deadline is None:
                deadline = time.monotonic() + 10
            elif time.monotonic() > deadline:
                raise BenchError("CMDQ stuck: CONS 0x%x, PROD 0x%x" % (cons, prod))

    def run_commands(self, cmds):
        prod = self.queue_commands(cmds)
        self.q.writel(self.reg(CMDQ_PROD), prod)
        return self.wait_cons(prod)

    def check_errors(self):
        """GERROR and the event queue, after a run: anything there is odd."""
        q = self.q
        gerror = q.readl(self.reg(GERROR)) ^ q.readl(self.reg(GERRORN))
        if gerror:
            self.notes.append("%s: GERROR 0x%x" % (self.tag, gerror))
        prod = q.readl(self.reg(EVENTQ_PROD))
        cons = q.readl(self.reg(EVENTQ_CONS))
        if prod != cons:
            size = 1 << self.evtq_log2
            events = []
            c = cons
            for _ in range(size):
                if c & ((size << 1) - 1) == prod & ((size << 1) - 1):
                    break
                rec = q.memread(EVTQ_ADDR + 32 * (c % size), 32)
                w = struct.unpack("<8I", rec)
                events.append("id 0x%x sid 0x%x" % (w[0] & 0xFF, w[1]))
                c += 1
            self.notes.append("%s: %d event(s) recorded, first: %s"
                              % (self.tag, len(events), ", ".join(events[:3])))

    # -- DMA --

    def dma_arm(self, iova, gpa):
        q = self.q
        q.writel(self.bar + ITD_GVA_LO, iova & 0xFFFFFFFF)
        q.writel(self.bar + ITD_GPA_LO, gpa & 0xFFFFFFFF)
        q.writel(self.bar + ITD_DBELL, 1)

    def dma_result(self):
        res = self.q.readl(self.bar + ITD_RESULT)
        if res != 0:
            raise BenchError("iommu-testdev DMA failed: 0x%08x" % res)

    def dma_prepare(self):
        q = self.q
        q.writel(self.bar + ITD_GVA_HI, IOVA_BASE >> 32)
        q.writel(self.bar + ITD_GPA_HI, DMA_GPA >> 32)
        q.writel(self.bar + ITD_LEN, 4)
        q.writel(self.bar + ITD_ATTRS, ITD_ATTRS_NS)

    def fresh_page(self):
        if self.next_page >= len(self.pages):
            raise BenchError("out of fresh pages: lower --scale")
        p = self.pages[self.next_page]
        self.next_page += 1
        return p


# ---- workloads -------------------------------------------------------------------------------

clock = time.perf_counter_ns


def p50(values):
    return statistics.median(values)


def net_us(samples, base_ns, div=1):
    """Samples less the baseline's p50, in microseconds."""
    return [(v - base_ns) / div / 1000.0 for v in samples]


def wl_register_read(inst, n):
    q = inst.q
    smmu = b"readl 0x%x\n" % inst.reg(CMDQ_CONS)
    ram = b"readl 0x%x\n" % RAM_PROBE
    for _ in range(200):
        q.raw(smmu)
        q.raw(ram)
    ts, tr = [], []
    for i in range(n):
        first, second = (smmu, ram) if i & 1 else (ram, smmu)
        t0 = clock()
        q.raw(first)
        t1 = clock()
        q.raw(second)
        t2 = clock()
        a, b = t1 - t0, t2 - t1
        if i & 1:
            ts.append(a)
            tr.append(b)
        else:
            tr.append(a)
            ts.append(b)
    return {"reg_read": net_us(ts, p50(tr))}, {"smmu_readl": p50(ts) / 1000.0,
                                              "ram_readl": p50(tr) / 1000.0}


def wl_register_batch(inst, n):
    """The series' qtest perf mode: 512 bytes of page 0 (64 8-byte reads) less RAM."""
    q = inst.q
    smmu = b"read 0x%x 0x200\n" % inst.base
    ram = b"read 0x%x 0x200\n" % RAM_PROBE
    for _ in range(20):
        q.raw(smmu)
        q.raw(ram)
    ts, tr = [], []
    for _ in range(n):
        t0 = clock()
        q.raw(smmu)
        t1 = clock()
        q.raw(ram)
        t2 = clock()
        ts.append(t1 - t0)
        tr.append(t2 - t1)
    return {"reg_batch": net_us(ts, p50(tr), 64)}, {}


def wl_cfgi(inst, n, groups, key):
    """`groups` x (64 CFGI_STE of unattached SIDs + CMD_SYNC) per CMDQ_PROD doorbell."""
    q = inst.q
    batch = b""
    for _ in range(groups):
        batch += b"".join(cfgi_ste(UNATTACHED_SID0 + s) for s in range(64)) + cmd_sync()
    prod_cmd = b"writel 0x%x 0x%%x\n" % inst.reg(CMDQ_PROD)
    base_w = b"writel 0x%x 0x0\n" % RAM_PROBE
    base_r = b"readl 0x%x\n" % RAM_PROBE
    for _ in range(10):
        inst.run_commands(batch)
    td, tb, polls = [], [], []
    for _ in range(n):
        prod = inst.queue_commands(batch)
        line = prod_cmd % prod
        t0 = clock()
        q.raw(line)
        polls.append(inst.wait_cons(prod))
        t1 = clock()
        q.raw(base_w)
        q.raw(base_r)
        t2 = clock()
        td.append(t1 - t0)
        tb.append(t2 - t1)
    return {key: net_us(td, p50(tb))}, {key + "_polls": max(polls)}


def wl_dma(inst, n):
    q = inst.q
    trig = b"readl 0x%x\n" % (inst.bar + ITD_TRIGGER)
    ram = b"readl 0x%x\n" % RAM_PROBE
    inst.dma_prepare()

    def timed_dma(iova, gpa):
        inst.dma_arm(iova, gpa)
        t0 = clock()
        q.raw(trig)
        t1 = clock()
        inst.dma_result()
        return t1 - t0

    for _ in range(20):                       # config caches, code paths
        iova, gpa = inst.fresh_page()
        timed_dma(iova, gpa)
        timed_dma(iova, gpa)
    miss, hit, inval, tr = [], [], [], []
    for _ in range(n):
        iova, gpa = inst.fresh_page()
        miss.append(timed_dma(iova + 0x40, gpa + 0x40))
        hit.append(timed_dma(iova + 0x80, gpa + 0x80))
        t0 = clock()
        q.raw(ram)
        tr.append(clock() - t0)
        inst.run_commands(tlbi_nh_va(ASID, iova) + cmd_sync())
        inval.append(timed_dma(iova + 0xC0, gpa + 0xC0))
    base = p50(tr)
    return {"dma_miss": net_us(miss, base), "dma_hit": net_us(hit, base),
            "dma_inval": net_us(inval, base)}, {}


# ---- the run ---------------------------------------------------------------------------------

CFGI_CMDS = {"cfgi64": 65, "cfgi1k": 16 * 65}

# key, label, unit (cmd/s rows are derived from the latency of the same sample key)
ROWS = [
    ("reg_read", "1. SMMU_CMDQ_CONS readl, over a RAM readl", "us"),
    ("reg_batch", "1b. page-0 register read, 64 x 8 B in one qtest read, per read", "us"),
    ("cfgi64", "2. 64 CFGI_STE (unattached SIDs) + CMD_SYNC per doorbell", "cmd/s"),
    ("cfgi64", "2'. the same: doorbell to CONS == PROD, over writel+readl of RAM", "us"),
    ("cfgi1k", "2b. 16 x (64 CFGI_STE + CMD_SYNC) per doorbell", "cmd/s"),
    ("cfgi1k", "2b'. the same: doorbell to CONS == PROD", "us"),
    ("dma_miss", "3. iommu-testdev DMA, never-used page (miss), over a RAM readl", "us"),
    ("dma_hit", "3b. DMA to the same page again (hit)", "us"),
    ("dma_inval", "3c. DMA after TLBI_NH_VA + CMD_SYNC of its page (miss)", "us"),
]


def run_instance(cfg, args, workdir, rnd, has_testdev):
    inst = Instance(cfg, args, workdir, "r%d-%s" % (rnd, cfg), has_testdev)
    samples, extra = {}, {}

    def watchdog():
        # A QEMU stuck in a read of ours: end it (our child, by pid); the read then fails.
        if inst.qemu and inst.qemu.poll() is None:
            inst.notes.append("%s: QEMU killed after %d s without finishing"
                              % (inst.tag, args.timeout))
            inst.qemu.kill()

    timer = threading.Timer(args.timeout, watchdog)
    timer.daemon = True
    timer.start()
    try:
        inst.start()
        inst.find_smmu()
        if has_testdev:
            inst.setup_pci()
        inst.build_tables()
        inst.enable_smmu()
        s = args.scale
        work = [lambda: wl_register_read(inst, int(3000 * s)),
                lambda: wl_register_batch(inst, int(300 * s)),
                lambda: wl_cfgi(inst, int(400 * s), 1, "cfgi64"),
                lambda: wl_cfgi(inst, int(40 * s), 16, "cfgi1k")]
        if has_testdev:
            work.append(lambda: wl_dma(inst, int(300 * s)))
        gc.disable()
        try:
            for w in work:
                sm, ex = w()
                samples.update(sm)
                extra.update(ex)
        finally:
            gc.enable()
        inst.check_errors()
    except OSError as e:
        raise BenchError("%s: %s" % (type(e).__name__, e))
    finally:
        timer.cancel()
        inst.stop()
    return samples, extra, inst


def fmt_value(v, unit):
    if v is None or v != v:
        return "n/a"
    if unit == "cmd/s":
        if abs(v) >= 1e6:
            return "%.2f M" % (v / 1e6)
        return "%.0f k" % (v / 1e3)
    if abs(v) >= 100:
        return "%.0f" % v
    if abs(v) >= 10:
        return "%.1f" % v
    return "%.2f" % v


def fmt_cell(vals, unit):
    vals = [v for v in vals if v is not None and v == v]
    if not vals:
        return "n/a"
    return "%s %s (%s–%s)" % (fmt_value(statistics.median(vals), unit), unit,
                              fmt_value(min(vals), unit), fmt_value(max(vals), unit))


def ratio(num, den):
    num = [v for v in num if v == v]
    den = [v for v in den if v == v]
    if not num or not den:
        return None
    n, d = statistics.median(num), statistics.median(den)
    if d <= 0 or n <= 0:
        return None
    return n / d


def fmt_ratio(r):
    if r is None:
        return "n/a"
    return "%.2fx" % r if r < 100 else "%.0fx" % r


def percentile(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]


def qemu_has(qemu, kind, name):
    try:
        out = subprocess.run([qemu, "-" + kind, "help"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.split()[:1] == [name] or ('"%s"' % name) in line
               for line in out.splitlines())


def scan_log(path, label):
    """Warnings and errors in a daemon's or QEMU's log, and the daemon's status line."""
    notes, status = [], None
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return notes, status
    for line in lines:
        low = line.lower()
        if "] status: " in low:
            status = line.strip()
            continue
        if " warn" in low or " error" in low or "error:" in low or "panic" in low:
            notes.append("%s: %s" % (label, line.strip()[:300]))
    return notes, status


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Environment: QEMU (required), VIOMMU_BACKEND (default "
               "target/release/viommu-backend), VIOMMU_BACKEND_ARGS (extra daemon options, "
               "e.g. '--ring-poll-us 10'), VIOMMU_USER_OPTS (extra viommu-user object "
               "properties, e.g. 'poll-us=0'), SMMU_BASE (override the probe), QTEST_LOG_FILE "
               "(QEMU's qtest log; default /dev/null).")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of A, B, C (default 7)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every sample count (default 1.0)")
    ap.add_argument("--configs", default="ABC", help="which of A, B, C to run (default ABC)")
    ap.add_argument("--timeout", type=int, default=600,
                    help="seconds one QEMU may take before it is killed (default 600)")
    ap.add_argument("--keep-logs", action="store_true",
                    help="keep the temporary directory with the QEMU and daemon logs")
    ap.add_argument("--verbose", action="store_true", help="print every round's p50s")
    args = ap.parse_args()

    args.qemu = os.environ.get("QEMU", "")
    if not args.qemu:
        print("SKIP: set QEMU=/path/to/qemu-system-aarch64 (with qemu-patches/ applied)")
        return SKIP
    if not os.access(args.qemu, os.X_OK):
        print("SKIP: QEMU=%s is not executable" % args.qemu)
        return SKIP
    if not qemu_has(args.qemu, "object", "viommu-user"):
        print("SKIP: %s has no viommu-user object (build it with qemu-patches/)" % args.qemu)
        return SKIP
    args.backend = os.environ.get("VIOMMU_BACKEND") or os.path.join(
        REPO, "target", "release", "viommu-backend")
    args.backend_args = os.environ.get("VIOMMU_BACKEND_ARGS", "")
    args.vu_opts = os.environ.get("VIOMMU_USER_OPTS", "")
    if any(c in args.configs.upper() for c in "BC") and not os.access(args.backend, os.X_OK):
        print("SKIP: %s missing: cargo build --release -p viommu-backend" % args.backend)
        return SKIP
    has_testdev = qemu_has(args.qemu, "device", "iommu-testdev")
    if not has_testdev:
        print("note: %s has no iommu-testdev: the DMA rows are skipped" % args.qemu)
    if has_testdev and int(300 * args.scale) + 20 > NUM_L3 * 256:
        print("--scale too large for the fresh pages (at most %.1f)"
              % ((NUM_L3 * 256 - 20) / 300))
        return 2
    configs = [c for c in "ABC" if c in args.configs.upper()]

    workdir = tempfile.mkdtemp(prefix="qtest-bench-")
    # per config: a list of rounds, each {key: [net samples in us]}; extras alike
    rounds = {c: [] for c in configs}
    extras = {c: [] for c in configs}
    notes, statuses = [], {}
    failed = False
    started = time.monotonic()
    load_before = os.getloadavg()
    for rnd in range(args.rounds):
        order = configs[rnd % len(configs):] + configs[: rnd % len(configs)]
        for cfg in order:
            try:
                samples, extra, inst = run_instance(cfg, args, workdir, rnd, has_testdev)
            except BenchError as e:
                failed = True
                notes.append("round %d %s: FAILED: %s" % (rnd, cfg, e))
                print("round %d %s: FAILED: %s" % (rnd, cfg, e), file=sys.stderr)
                continue
            notes.extend(inst.notes)
            rounds[cfg].append(samples)
            extras[cfg].append(extra)
            for path, label in ((inst.qemu_log, "%s QEMU" % inst.tag),
                                (getattr(inst, "daemon_log", None), "%s daemon" % inst.tag)):
                if path:
                    n, st = scan_log(path, label)
                    notes.extend(n)
                    if st:
                        statuses[inst.tag] = st
            if args.verbose:
                print("round %d %s: %s" % (rnd, cfg, ", ".join(
                    "%s=%.3g" % (k, p50(v)) for k, v in sorted(samples.items()))),
                    file=sys.stderr)
        print("round %d/%d done (%.0f s)" % (rnd + 1, args.rounds,
                                             time.monotonic() - started), file=sys.stderr)
    load_after = os.getloadavg()

    def per_round(cfg, key, unit):
        """Each round's p50 (or the rate at that p50)."""
        out = []
        for r in rounds.get(cfg, []):
            if key not in r:
                continue
            v = p50(r[key])
            if unit == "cmd/s":
                v = CFGI_CMDS[key] / (v * 1e-6) if v > 0 else float("nan")
            out.append(v)
        return out

    print()
    print("| workload | A in-process | B messages | C shared | B/A | C/A |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key, label, unit in ROWS:
        cells = [fmt_cell(per_round(c, key, unit), unit) if c in configs else "-"
                 for c in "ABC"]
        ra = [fmt_ratio(ratio(per_round(c, key, unit), per_round("A", key, unit)))
              if c in configs and "A" in configs else "-" for c in "BC"]
        print("| %s | %s | %s | %s | %s | %s |" % (label, *cells, *ra))
    nr = min(len(v) for v in rounds.values()) if rounds else 0
    print()
    print("Each cell: the median over %d rounds of that round's p50, (min–max of the per-round "
          "p50s). Times are the extra cost over the same qtest round trip to guest RAM, "
          "measured interleaved; cmd/s (higher is better) is the commands of one doorbell "
          "over that time. Ratios are of the medians (for cmd/s, of throughputs)." % nr)

    print()
    print("Spread over all samples, pooled across rounds (each less its round's baseline): "
          "p10 / p50 / p90, us")
    print()
    print("| workload | A in-process | B messages | C shared |")
    print("| --- | --- | --- | --- |")
    seen = set()
    for key, label, unit in ROWS:
        if key in seen:
            continue
        seen.add(key)
        cells = []
        for c in "ABC":
            pooled = [v for r in rounds.get(c, []) for v in r.get(key, [])]
            if not pooled:
                cells.append("-" if c not in configs else "n/a")
                continue
            cells.append("%s / %s / %s (n=%d)" % tuple(
                [fmt_value(percentile(pooled, q), "us") for q in (0.1, 0.5, 0.9)]
                + [len(pooled)]))
        print("| %s | %s | %s | %s |" % (label.split(":")[0].split(", over")[0], *cells))

    print()
    raw = []
    for c in configs:
        sr = [e["smmu_readl"] for e in extras[c] if "smmu_readl" in e]
        rr = [e["ram_readl"] for e in extras[c] if "ram_readl" in e]
        if sr:
            raw.append("%s %.1f us (RAM %.1f us)" % (c, p50(sr), p50(rr)))
    if raw:
        print("Raw qtest readl p50, SMMU_CMDQ_CONS: " + ", ".join(raw) + ".")
    polls = {c: max([e.get("cfgi64_polls", 0) for e in extras[c]]
                    + [e.get("cfgi1k_polls", 0) for e in extras[c]] + [0]) for c in configs}
    print("Most CMDQ_CONS reads a doorbell needed: " +
          ", ".join("%s %d" % kv for kv in polls.items()) + ".")
    print("Load average (1/5/15 min): %.2f %.2f %.2f before, %.2f %.2f %.2f after; %d CPUs."
          % (*load_before, *load_after, os.cpu_count() or 0))

    def med(cfg, key, unit="us"):
        s = per_round(cfg, key, unit)
        return statistics.median(s) if s else None

    print()
    print("Targets:")
    checks = []
    if "A" in configs and "C" in configs:
        r = ratio(per_round("C", "cfgi64", "cmd/s"), per_round("A", "cfgi64", "cmd/s"))
        r2 = ratio(per_round("C", "cfgi1k", "cmd/s"), per_round("A", "cfgi1k", "cmd/s"))
        checks.append(("CFGI_STE of unattached SIDs, C >= 2x A's throughput",
                       r is not None and r >= 2,
                       "C/A = %s at 64 per doorbell; %s at 16 x 64" % (fmt_ratio(r),
                                                                      fmt_ratio(r2))))
        if has_testdev:
            r = ratio(per_round("C", "dma_miss", "us"), per_round("A", "dma_miss", "us"))
            checks.append(("translated-DMA miss, C <= 3x A's latency",
                           r is not None and r <= 3, "C/A = %s" % fmt_ratio(r)))
    if "C" in configs:
        v = med("C", "reg_read")
        checks.append(("register read, C p50 < 1 us", v is not None and v < 1,
                       "C = %s us" % fmt_value(v, "us")))
    for what, ok, detail in checks:
        print("- %s: %s (%s)" % (what, "met" if ok else "NOT met", detail))

    if statuses:
        print()
        print("Daemon counters (SIGUSR1 status line, last round of each):")
        last = {}
        for tag, st in statuses.items():
            last[tag.split("-")[1]] = (tag, st.split("] ", 1)[-1])
        for c in sorted(last):
            print("- %s: %s" % last[c])
    if notes:
        print()
        print("Notes:")
        seen = set()
        for n in notes:
            k = n.split(": ", 1)[-1]
            if k in seen:
                continue
            seen.add(k)
            print("- " + n)

    env = ["QEMU=" + shlex.quote(args.qemu)]
    for var in ("VIOMMU_BACKEND", "VIOMMU_BACKEND_ARGS", "VIOMMU_USER_OPTS", "SMMU_BASE"):
        if os.environ.get(var):
            env.append("%s=%s" % (var, shlex.quote(os.environ[var])))
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    print()
    print("Rerun (from %s): `%s python3 %s%s`" % (
        REPO, " ".join(env), os.path.relpath(os.path.abspath(__file__), REPO),
        (" " + argv) if argv else ""))
    if args.keep_logs or failed or notes:
        print("Logs kept in %s" % workdir)
    else:
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
