#!/usr/bin/env bash
# The viommu-user end-to-end test: boots an arm64 Linux 7.3 guest under QEMU (TCG, direct kernel
# boot with a device tree) with an SMMUv3 and, behind it, a virtio-blk-pci disk and a
# virtio-net-pci NIC (iommu_platform=on), then checks from inside the guest that the guest's
# arm-smmu-v3 driver runs the vSMMU, that both devices sit in translated (DMA) IOMMU domains, that
# disk reads return the right data, that MSIs arrive and that the NIC transmits and receives.
# Host: Debian 12 (bookworm) x86_64; the kernel and busybox come from Debian's archive, as in
# tests/lab/run.sh (whose unpacked linux-source and busybox it reuses when present).
#
# usage: QEMU=/path/to/qemu-system-aarch64 tests/e2e/qemu-guest.sh [--prepare-only]
#   --prepare-only   install, download and build the guest kernel and initramfs (and the backend
#                    in user mode), but do not boot the guest; QEMU need not be set
# env:
#   QEMU                  qemu-system-aarch64 to test (required). user mode needs QEMU 10.2 with
#                         the qemu-patches/ series (-object viommu-user); inprocess mode any
#                         QEMU >= 10.0 (before 10.1, whose arm-smmuv3 is not user-creatable, the
#                         machine's iommu=smmuv3 stands in for -device arm-smmuv3)
#   VIOMMU_E2E_SMMU       user (default): the SMMUv3 is a fresh viommu-backend reached over a
#                         Unix socket; inprocess: QEMU's own emulated SMMUv3
#   VIOMMU_E2E_SHARED     on (default) or off: whether QEMU may use the shared region
#                         (docs/protocol.md, section 10) with the backend, in user mode
#   VIOMMU_E2E_USER_OPTS  more properties for -object viommu-user (e.g. poll-us=0), user mode
#   VIOMMU_BACKEND_ARGS   more viommu-backend options (e.g. --busy-poll-us 0), user mode
#   VIOMMU_BACKEND        viommu-backend binary for user mode (default: `cargo build --release
#                         -p viommu-backend` in this repo, honouring CARGO_TARGET_DIR)
#   VIOMMU_E2E_CACHE      cache dir outside the repo (default /var/cache/viommu-e2e)
#   VIOMMU_LAB_CACHE      the lab's cache dir, whose unpacked packages are reused if present
#                         (default /var/cache/viommu-lab-ci); it is only read
#   VIOMMU_E2E_TIMEOUT    seconds QEMU may run (default 600)
#   VIOMMU_E2E_DISK_MB    size of the test disk in MiB (default 64)
#   RUST_LOG              passed on to viommu-backend (user mode) when set
#
# Output (stdout): `ok NAME` or `FAIL NAME: reason` per test, a summary line
# `e2e: mode=M boot=B s (guest uptime U s) disk-read=R MB/s`, in user mode also a line
# `e2e: per 4 KiB page read: X socket messages (T TRANSLATE, C backend-channel), R translations
# in the shared region` from the backend's status lines at the guest's marks around the reads,
# with kill-resume the lines `e2e: kill -9 outages (ms): A B C D E F` (see kill-resume below) and
# `e2e: kill-resume: ...` (the guest's read at each kill, the QMP samples), then a last line
# `N passed, M failed`.
# Step timings as `TIME <s> s: <step>` on stderr. A missing prerequisite prints one line starting
# with `SKIPPED:` (the machine cannot provide it) or `ERROR:` (something broke) and no result line.
# Exit status: 0 all passed (N > 0, M = 0); 1 tests failed; 2 ERROR; 77 SKIPPED.
# Tests, in the guest (tests/e2e/init): smmu-probe (the guest's arm-smmu-v3 driver runs the
# SMMU), iommu-dma (both virtio devices in DMA domains behind it), disk-sha256, disk-read (O_DIRECT
# throughput), virtio-net (TX and RX), msi (the virtio MSI-X vectors fired), smmu-events (no SMMU
# event or gerror), backend-restart (user mode: the guest keeps reading the disk while the host
# stops the VM, restarts viommu-backend, waits for QEMU to reconnect and the new backend to
# restore the vSMMU's state, and continues the VM); on the host: shutdown (the guest finished and
# powered off), backend (user mode: viommu-backend exits with status 0 on SIGTERM, did not panic,
# refused no message and answered the devices' translations), kill-resume (user mode with the
# shared region and a backend that offers RESUME: after backend-restart, while the guest goes on
# reading its disk, viommu-backend is killed with SIGKILL at the start of 5 of its reads and once
# during a burst of unmaps, and a new one started on the same socket each time; QEMU reconnects
# and the new backend resumes the vSMMU from the shared region while the VM runs: QMP
# query-status, polled every 20 ms, must say "running" throughout, with no STOP event, every read
# from the first kill on must return the right data, and a read must follow the last kill).
# The outage of a kill is the time from just before `kill -9` to the new backend's log line
# "vSMMU resumed from the shared region", polled every 5 ms: the new backend has then taken the
# vSMMU's state and applies the register writes QEMU posted meanwhile and answers what waited.
#
# Cache layout ($VIOMMU_E2E_CACHE):
#   kernel/<sha256(kernel.config + linux-source version)>/Image   guest kernel (+ .config)
#   linux-source/<ver>/  busybox/<ver>/    unpacked Debian packages (unless the lab has them)
#   logs/                step logs, the last guest console (console-<mode>.log), QEMU's stderr
#                        (qemu-<mode>.log) and the backend's log (backend.log)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${VIOMMU_E2E_CACHE:-/var/cache/viommu-e2e}
LAB_CACHE=${VIOMMU_LAB_CACHE:-/var/cache/viommu-lab-ci}
TIMEOUT=${VIOMMU_E2E_TIMEOUT:-600}
MODE=${VIOMMU_E2E_SMMU:-user}
SHARED=${VIOMMU_E2E_SHARED:-on}
read -r -a BACKEND_ARGS <<<"${VIOMMU_BACKEND_ARGS:-}"
DISK_MB=${VIOMMU_E2E_DISK_MB:-64}
LINUX_SOURCE=linux-source-7.3
GUEST_TESTS=(smmu-probe iommu-dma disk-sha256 disk-read virtio-net msi smmu-events)

# ---- arguments and the shared helpers -------------------------------------------------------
# shellcheck source=tests/lib/common.sh
source "$HERE/../lib/common.sh"
prepare_only_args "$@"
note() { echo "e2e: $*" >&2; }

# ---- 0. arguments, QEMU (fail fast, before anything expensive) -------------------------------
case "$MODE" in
user | inprocess) ;;
*) error "VIOMMU_E2E_SMMU='$MODE' is neither user nor inprocess" ;;
esac
case "$SHARED" in on | off) ;; *) error "VIOMMU_E2E_SHARED='$SHARED' is neither on nor off" ;; esac
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || error "VIOMMU_E2E_TIMEOUT='$TIMEOUT' is not a number of seconds"
[[ $DISK_MB =~ ^[1-9][0-9]*$ ]] || error "VIOMMU_E2E_DISK_MB='$DISK_MB' is not a number of MiB"
SMMU_DEVICE=1   # -device arm-smmuv3 (QEMU >= 10.1) rather than -M virt,iommu=smmuv3
if [ "$PREPARE_ONLY" = 0 ]; then
    [ -n "${QEMU:-}" ] || skip "QEMU is not set (set QEMU=/path/to/qemu-system-aarch64: for VIOMMU_E2E_SMMU=user a QEMU 10.2 built with the qemu-patches/ series, for VIOMMU_E2E_SMMU=inprocess any QEMU >= 10.0, e.g. Debian's qemu-system-arm from bookworm-backports: apt-get install -t bookworm-backports qemu-system-arm, QEMU=/usr/bin/qemu-system-aarch64)"
    QEMU_PATH=$(command -v "$QEMU") || QEMU_PATH=""
    [ -x "$QEMU_PATH" ] || skip "QEMU=$QEMU is not an executable"
    QEMU=$QEMU_PATH
    QEMU_VERSION=$("$QEMU" --version 2>/dev/null | head -n1) || error "'$QEMU --version' failed"
    [[ $QEMU_VERSION =~ version\ ([0-9]+)\.([0-9]+) ]] || error "cannot parse the QEMU version from '$QEMU_VERSION'"
    QEMU_MAJOR=${BASH_REMATCH[1]} QEMU_MINOR=${BASH_REMATCH[2]}
    [ "$QEMU_MAJOR" -ge 10 ] || skip "QEMU too old: '$QEMU_VERSION' (the e2e test needs QEMU >= 10.0)"
    [ "$QEMU_MAJOR" -gt 10 ] || [ "$QEMU_MINOR" -ge 1 ] || SMMU_DEVICE=0
    if [ "$MODE" = user ]; then
        [ "$SMMU_DEVICE" = 1 ] || skip "QEMU '$QEMU_VERSION' has no user-creatable arm-smmuv3 (QEMU >= 10.1) and so no viommu-user: user mode needs QEMU 10.2 with the qemu-patches/ series"
        "$QEMU" -object help 2>/dev/null | grep -qx ' *viommu-user' ||
            skip "QEMU '$QEMU_VERSION' ($QEMU) has no -object viommu-user: user mode needs QEMU 10.2 with the qemu-patches/ series"
    elif [ "$SMMU_DEVICE" = 0 ]; then
        note "QEMU $QEMU_MAJOR.$QEMU_MINOR < 10.1 has no -device arm-smmuv3: using -M virt,iommu=smmuv3 instead (inprocess mode only)"
    fi
    for dev in virtio-blk-pci virtio-net-pci; do
        "$QEMU" -M virt -device help 2>/dev/null | grep -q "name \"$dev\"" || skip "QEMU ($QEMU) has no device $dev"
    done
    "$QEMU" -M none -netdev help 2>/dev/null | grep -qx dgram || skip "QEMU ($QEMU) has no -netdev dgram"
fi

# ---- 1. cache dir, host packages (installed only when missing) -------------------------------
open_cache VIOMMU_E2E_CACHE e2e
RUN=""
QEMU_PID=""
BACKEND_PID=""
cleanup() {
    # the QEMU pid is that of timeout(1), which passes the signal on to QEMU
    [ -z "$QEMU_PID" ] || { kill "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null; } || true
    [ -z "$BACKEND_PID" ] || { kill -KILL "$BACKEND_PID" 2>/dev/null && wait "$BACKEND_PID" 2>/dev/null; } || true
    [ -z "${QMP_POLL_PID:-}" ] || { kill "$QMP_POLL_PID" 2>/dev/null && wait "$QMP_POLL_PID" 2>/dev/null; } || true
    [ -z "$RUN" ] || rm -rf "$RUN"
    rm -rf "$CACHE"/tmp.*
}
trap cleanup EXIT
trap 'exit 130' INT TERM
note "cache $CACHE"

# shellcheck disable=SC1091
OS=$(. /etc/os-release 2>/dev/null && echo "${ID:-}:${VERSION_CODENAME:-}")
[ "$OS" = debian:bookworm ] || skip "host is '$OS', the e2e test needs Debian 12 (bookworm) with apt"
export DEBIAN_FRONTEND=noninteractive
APT_OFFLINE=""
APT_UPDATED=0
# apt_update: the lab's apt sources (trixie-backports has linux-source-7.3), arm64 as a foreign
# architecture (busybox-static:arm64), then apt-get update; once per run, only when needed
apt_update() {
    [ "$APT_UPDATED" = 0 ] || return 0
    APT_UPDATED=1
    [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null || skip "not root and no password-less sudo: cannot install packages"
    lab_apt_sources
    if ! t "apt-get update" logged apt-update as_root apt-get update; then
        APT_OFFLINE=" (apt-get update failed: no network to the Debian archive?)"
        note "WARNING: apt-get update failed; continuing with installed and cached packages"
    fi
}
# the commands this script runs, each with the Debian package that has it
HOST_TOOLS=(aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu make:make gcc:gcc flex:flex bison:bison bc:bc
    cpio:cpio xz:xz-utils gzip:gzip openssl:openssl python3:python3 flock:util-linux timeout:coreutils)
MISSING=()
for tool in "${HOST_TOOLS[@]}"; do
    command -v "${tool%%:*}" >/dev/null || MISSING+=("${tool#*:}")
done
if [ ${#MISSING[@]} -gt 0 ]; then
    apt_update
    t "apt-get install ${MISSING[*]}" logged apt-host as_root apt-get install -y -q --no-install-recommends "${MISSING[@]}" libc6-dev ||
        { tail_log apt-host 5; skip "cannot install host packages ${MISSING[*]}$APT_OFFLINE"; }
fi

# version_of VAR PKG: VAR = the candidate version of PKG in the configured archive
version_of() {
    local v
    v=$(candidate "$2")
    if [[ -z $v || $v == "(none)" ]]; then
        apt_update
        v=$(candidate "$2")
    fi
    [[ -n $v && $v != "(none)" ]] || skip "package $2 is not available from the configured Debian archive$APT_OFFLINE"
    printf -v "$1" '%s' "$v"
}
# unpacked VAR PKG VERSION KIND [HOOK]: VAR = the dir of PKG=VERSION unpacked: the lab's
# ($LAB_CACHE/KIND/<ver>, only read) if it has it, else ours (unpacked once)
unpacked() {
    local var=$1 pkg=$2 ver=$3 kind=$4 hook=${5:-} dir
    dir=$LAB_CACHE/$kind/$(safe "$ver")
    if [ ! -d "$dir" ]; then
        dir=$CACHE/$kind/$(safe "$ver")
        t "unpack $pkg $ver" unpack "$pkg" "$ver" "$dir" "$hook"
    fi
    printf -v "$var" '%s' "$dir"
}

version_of BUSYBOX_VERSION busybox-static:arm64
unpacked BUSYBOX_DIR busybox-static:arm64 "$BUSYBOX_VERSION" busybox
BUSYBOX=$BUSYBOX_DIR/bin/busybox
[ -x "$BUSYBOX" ] || error "no bin/busybox in busybox-static:arm64 $BUSYBOX_VERSION ($BUSYBOX_DIR)"

# ---- 2. guest kernel, keyed by the config fragment and the linux-source version ---------------
version_of LINUX_VERSION "$LINUX_SOURCE"
# linux_tree VAR: VAR = the unpacked linux source tree, the lab's if it has one
linux_tree() { unpacked "$1" "$LINUX_SOURCE" "$LINUX_VERSION" linux-source untar_linux; }
guest_kernel "$REPO/tests/lib/kernel.config" tests/lib/kernel.config linux_tree

# ---- 3. viommu-backend (user mode) ------------------------------------------------------------
BACKEND=""
if [ "$MODE" = user ]; then
    if [ -n "${VIOMMU_BACKEND:-}" ]; then
        BACKEND=$(command -v "$VIOMMU_BACKEND") || BACKEND=""
        [ -x "$BACKEND" ] || skip "VIOMMU_BACKEND=$VIOMMU_BACKEND is not an executable"
    else
        [ -d "$HOME/.cargo/bin" ] && PATH=$HOME/.cargo/bin:$PATH
        command -v cargo >/dev/null || skip "no cargo on PATH to build viommu-backend (or set VIOMMU_BACKEND)"
        TARGET_DIR=$(cd "$REPO" && cargo metadata --no-deps --format-version 1 2>/dev/null |
            python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])') ||
            error "cargo metadata failed for $REPO"
        t "cargo build --release -p viommu-backend" logged cargo-backend \
            env -C "$REPO" cargo build --release --locked -p viommu-backend --bin viommu-backend ||
            { tail_log cargo-backend 25; error "cargo build of viommu-backend failed (log $LOGS/cargo-backend.log)"; }
        BACKEND=$TARGET_DIR/release/viommu-backend
        [ -x "$BACKEND" ] || error "no $BACKEND after cargo build"
    fi
    note "backend $BACKEND"
fi

# ---- 4. initramfs and the test disk -----------------------------------------------------------
RUN=$(mktemp -d "${TMPDIR:-/tmp}/viommu-e2e.XXXXXX")   # short: it holds the backend's socket
mkdir -p "$RUN/root"/{bin,proc,sys,dev,tmp}
cp "$BUSYBOX" "$RUN/root/bin/busybox"
cp "$HERE/init" "$RUN/root/init"
chmod 755 "$RUN/root/init"
(cd "$RUN/root" && find . | cpio -o -H newc -R 0:0 --quiet | gzip -1) >"$RUN/initrd.cpio.gz"
rm -rf "$RUN/root"
# DISK_MB MiB of AES-128-CTR keystream under a fixed key: pseudo-random, never zero, reproducible
DISK=$RUN/disk.img
head -c $((DISK_MB << 20)) /dev/zero |
    openssl enc -aes-128-ctr -nosalt -K 76696f6d6d752d6532652d6469736b30 -iv 00000000000000000000000000000000 >"$DISK" 2>"$LOGS/openssl.log" ||
    { tail_log openssl 5; error "cannot create the test disk with openssl"; }
[ "$(stat -c %s "$DISK")" = $((DISK_MB << 20)) ] || error "the test disk $DISK is not $DISK_MB MiB"
DISK_SHA=$(sha256sum "$DISK" | cut -d' ' -f1)
note "kernel key $KERNEL_KEY ($LINUX_SOURCE $LINUX_VERSION), disk sha256 $DISK_SHA"

if [ "$PREPARE_ONLY" = 1 ]; then
    echo "TIME $(since "$T0") s: total (prepare only)" >&2
    echo "e2e: prepared: $IMAGE, busybox $BUSYBOX_VERSION${BACKEND:+, $BACKEND}"
    exit 0
fi

# ---- 5. the backend, then the guest ----------------------------------------------------------
PASSED=0
FAILED=0
pass() { echo "ok $1"; PASSED=$((PASSED + 1)); }
fail() { echo "FAIL $1: $2"; FAILED=$((FAILED + 1)); }

RESTART_ARGS=""
if [ "$MODE" = user ]; then
    # the backend-restart test: the guest reads the disk's first 8 MiB RESTART_LOOPS times while
    # the host stops the VM, restarts viommu-backend and lets QEMU put the vSMMU back (and, for
    # kill-resume, kills it six times afterwards)
    RESTART_LOOPS=12
    KILL_RESUME=0
    CAPABILITIES=$("$BACKEND" --print-capabilities 2>/dev/null || true)
    if [ "$SHARED" = on ] && [[ $CAPABILITIES == *'"resume"'* ]]; then
        KILL_RESUME=1
        RESTART_LOOPS=18
    else
        note "kill-resume not run: it needs the shared region (VIOMMU_E2E_SHARED=on) and a backend that offers RESUME"
    fi
    RESTART_ARGS=" e2e.restart=$RESTART_LOOPS e2e.sha8=$(head -c $((8 << 20)) "$DISK" | sha256sum | cut -d' ' -f1)"
    GUEST_TESTS+=(backend-restart)
fi
# shellcheck disable=SC2054  # the commas belong to QEMU option values
QEMU_ARGS=(-accel tcg,thread=multi -cpu max,pauth-impdef=on -smp 2 -m 1G
    -object memory-backend-memfd,id=mem0,size=1G,share=on
    -nographic -no-reboot -nic none
    -drive "file=$DISK,if=none,id=disk0,format=raw,readonly=on"
    -device virtio-blk-pci,drive=disk0,iommu_platform=on,disable-legacy=on
    # frames the guest sends come back to it: the datagram socket sends to itself
    -netdev "dgram,id=net0,local.type=unix,local.path=$RUN/net.sock,remote.type=unix,remote.path=$RUN/net.sock"
    -device virtio-net-pci,netdev=net0,mac=52:54:00:e2:e2:01,iommu_platform=on,disable-legacy=on,romfile=
    -kernel "$IMAGE" -initrd "$RUN/initrd.cpio.gz"
    -append "console=ttyAMA0 panic=-1 quiet iommu.passthrough=0 e2e.sha256=$DISK_SHA e2e.size=$((DISK_MB << 20))$RESTART_ARGS")
# shellcheck disable=SC2054  # the commas belong to QEMU option values
if [ "$MODE" = user ]; then
    BACKEND_LOG=$LOGS/backend.log
    FIRST_BACKEND_LOG=$BACKEND_LOG
    "$BACKEND" "${BACKEND_ARGS[@]}" --socket-path "$RUN/vsmmu.sock" >"$BACKEND_LOG" 2>&1 &
    BACKEND_PID=$!
    for _ in $(seq 100); do
        if [ -S "$RUN/vsmmu.sock" ] || ! kill -0 "$BACKEND_PID" 2>/dev/null; then break; fi
        sleep 0.1
    done
    if ! kill -0 "$BACKEND_PID" 2>/dev/null; then
        rc=0
        wait "$BACKEND_PID" || rc=$?
        BACKEND_PID=""
        tail_log backend
        error "viommu-backend exited with status $rc before QEMU started (log $BACKEND_LOG)"
    fi
    [ -S "$RUN/vsmmu.sock" ] || { tail_log backend; error "viommu-backend did not create $RUN/vsmmu.sock within 10 s (log $BACKEND_LOG)"; }
    QEMU_ARGS+=(-chardev "socket,id=vsmmu0,path=$RUN/vsmmu.sock,reconnect-ms=100"
        -object "viommu-user,id=vu0,chardev=vsmmu0,shared-region=$SHARED${VIOMMU_E2E_USER_OPTS:+,$VIOMMU_E2E_USER_OPTS}" -qmp "unix:$RUN/qmp.sock,server=on,wait=off"
        -M virt,gic-version=3,memory-backend=mem0
        -device arm-smmuv3,primary-bus=pcie.0,id=smmuv3.0,viommu=vu0)
elif [ "$SMMU_DEVICE" = 1 ]; then
    QEMU_ARGS+=(-M virt,gic-version=3,memory-backend=mem0 -device arm-smmuv3,primary-bus=pcie.0,id=smmuv3.0)
else
    QEMU_ARGS+=(-M virt,gic-version=3,memory-backend=mem0,iommu=smmuv3)
fi
CONSOLE=$LOGS/console-$MODE.log
QEMU_LOG=$LOGS/qemu-$MODE.log
printf '%q ' "$QEMU" "${QEMU_ARGS[@]}" >"$QEMU_LOG"
printf '\n' >>"$QEMU_LOG"
note "$QEMU_VERSION, mode $MODE; console $CONSOLE"

S=$EPOCHREALTIME
timeout -k 10 "$TIMEOUT" "$QEMU" "${QEMU_ARGS[@]}" </dev/null >"$RUN/console.raw" 2>>"$QEMU_LOG" &
QEMU_PID=$!
BOOT=""
while kill -0 "$QEMU_PID" 2>/dev/null; do
    if grep -q '^E2E-INIT' "$RUN/console.raw"; then
        BOOT=$(since "$S")
        break
    fi
    sleep 0.05
done
# qmp COMMAND: run a QMP command without arguments, print its "return" as JSON
qmp() {
    python3 - "$RUN/qmp.sock" "$1" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
json.loads(f.readline())
for cmd in ("qmp_capabilities", sys.argv[2]):
    f.write(json.dumps({"execute": cmd}) + "\n")
    f.flush()
    while True:
        msg = json.loads(f.readline())
        if "return" in msg or "error" in msg:
            break
print(json.dumps(msg.get("return", msg)))
EOF
}
# wait_line SECONDS PATTERN FILE: wait up to SECONDS for a line matching PATTERN in FILE
wait_line() {
    local end=$((SECONDS + $1))
    while [ "$SECONDS" -lt "$end" ]; do
        grep -q -- "$2" "$3" 2>/dev/null && return 0
        kill -0 "$QEMU_PID" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}
# restart_backend: at the guest's third read, stop the VM (QEMU takes the vSMMU's state), stop
# viommu-backend, start a new one on the same socket, wait until QEMU has reconnected and the new
# backend restored the state, then let the VM run on; RESTART says what happened
restart_backend() {
    local status
    wait_line 120 '^E2E-LOOP 3 ' "$RUN/console.raw" || { RESTART="the guest never reached its third read"; return; }
    [ "$(qmp stop)" = "{}" ] || { RESTART="QMP stop failed"; return; }
    kill -TERM "$BACKEND_PID"
    wait "$BACKEND_PID" || { RESTART="the first viommu-backend exited with status $? on SIGTERM"; BACKEND_PID=""; return; }
    BACKEND_PID=""
    AT_RESTART=$(grep -c '^E2E-LOOP ' "$RUN/console.raw")
    "$BACKEND" "${BACKEND_ARGS[@]}" --socket-path "$RUN/vsmmu.sock" >"$BACKEND_LOG.2" 2>&1 &
    BACKEND_PID=$!
    BACKEND_LOG=$BACKEND_LOG.2
    wait_line 30 'state restored' "$BACKEND_LOG" || { RESTART="the new viommu-backend did not restore the state (log $BACKEND_LOG)"; return; }
    sleep 0.5   # QEMU attaches passthrough devices after SET_STATE: none here
    status=$(qmp query-status)
    [[ $status == *'"status": "paused"'* ]] || { RESTART="the VM was not left paused across the restart: $status"; return; }
    [ "$(qmp cont)" = "{}" ] || { RESTART="QMP cont failed"; return; }
    RESTART=ok
}
# backend_commands: the SMMU commands the running viommu-backend has executed, from the status
# line it logs on SIGUSR1
backend_commands() {
    local before after
    before=$(grep -c 'status: state' "$BACKEND_LOG" || true)
    kill -USR1 "$BACKEND_PID" 2>/dev/null || return 1
    for _ in $(seq 100); do
        after=$(grep -c 'status: state' "$BACKEND_LOG" || true)
        [ "$after" -gt "$before" ] && break
        sleep 0.002
    done
    grep 'status: state' "$BACKEND_LOG" | tail -n1 | sed -n 's/.* \([0-9][0-9]*\) commands (.*/\1/p' | grep .
}
# qmp_poll STATUS STOP: a QMP client that asks query-status every 20 ms until the file STOP exists,
# writing `<sent> <answered> <status>` lines (EPOCHREALTIME seconds) and `event <NAME>` for the
# STOP and RESUME events into STATUS
qmp_poll() {
    python3 - "$RUN/qmp.sock" "$1" "$2" <<'EOF'
import json, os, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
out = open(sys.argv[2], "w", buffering=1)
json.loads(f.readline())
def call(cmd):
    f.write(json.dumps({"execute": cmd}) + "\n")
    f.flush()
    while True:
        line = f.readline()
        if not line:
            sys.exit(0)
        msg = json.loads(line)
        if msg.get("event") in ("STOP", "RESUME"):
            out.write("event %s\n" % msg["event"])
        if "return" in msg or "error" in msg:
            return msg
call("qmp_capabilities")
while not os.path.exists(sys.argv[3]):
    sent = time.time()
    status = call("query-status").get("return", {}).get("status", "?")
    out.write("%.6f %.6f %s\n" % (sent, time.time(), status))
    time.sleep(0.02)
EOF
}
# kill_resume: after the restart, at the start of the guest's next 5 reads (0.55 s after it
# reported a read: it sleeps 0.5 s between them), then once during a burst of unmaps (the
# backend's command count rising by 2 or more between two status samples ~10 ms apart while the
# guest reads: its IOMMU driver invalidating the IOVAs it unmapped, TLBI and CMD_SYNC), SIGKILL
# viommu-backend and start a new one on the same socket at once, then wait for the new one to
# resume the vSMMU. KILLRES says what happened, OUTAGES has the outage of each kill in ms,
# KILL_AT the guest's read count at each kill, BURST the commands seen in the burst
kill_resume() {
    local k loop t0 t1 c0 c1 end
    loop=$(grep -c '^E2E-LOOP ' "$RUN/console.raw" || true)
    rm -f "$RUN/qmp-poll.stop"
    qmp_poll "$RUN/qmp-status.log" "$RUN/qmp-poll.stop" &
    QMP_POLL_PID=$!
    for k in 1 2 3 4 5 6; do
        loop=$((loop + 1))
        wait_line 120 "^E2E-LOOP $loop " "$RUN/console.raw" || { KILLRES="the guest never finished its read $loop"; break; }
        sleep 0.55
        if [ "$k" = 6 ]; then
            c0=$(backend_commands) || { KILLRES="no command count in the backend's status line (log $BACKEND_LOG)"; break; }
            end=$((SECONDS + 10))
            while [ "$SECONDS" -lt "$end" ]; do
                sleep 0.01
                c1=$(backend_commands) || break
                if [ $((c1 - c0)) -ge 2 ]; then
                    BURST=$((c1 - c0))
                    break
                fi
                c0=$c1
            done
            [ -n "$BURST" ] || { KILLRES="no burst of unmaps within 10 s of the guest's read $((loop + 1))"; break; }
        fi
        KILL_AT+=("$(grep -c '^E2E-LOOP ' "$RUN/console.raw" || true)")
        t0=$EPOCHREALTIME
        kill -KILL "$BACKEND_PID"
        wait "$BACKEND_PID" 2>/dev/null || true
        BACKEND_LOG=$LOGS/backend.log.kill$k
        "$BACKEND" "${BACKEND_ARGS[@]}" --socket-path "$RUN/vsmmu.sock" >"$BACKEND_LOG" 2>&1 &
        BACKEND_PID=$!
        end=$((SECONDS + 60))
        until grep -q -e 'vSMMU resumed from the shared region' -e 'shared region set' "$BACKEND_LOG"; do
            if ! kill -0 "$BACKEND_PID" 2>/dev/null || [ "$SECONDS" -ge "$end" ]; then
                KILLRES="kill $k: the new viommu-backend did not take the shared region within 60 s (log $BACKEND_LOG)"
                break 2
            fi
            sleep 0.005
        done
        t1=$EPOCHREALTIME
        grep -q 'vSMMU resumed from the shared region' "$BACKEND_LOG" ||
            { KILLRES="kill $k: the new viommu-backend was given a fresh region, not the vSMMU to resume (log $BACKEND_LOG)"; break; }
        OUTAGES+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", (b - a) * 1000 }')")
        WINDOWS+=("$t0:$t1")
    done
    # the VM runs on after the last resume too
    sleep 0.5
    touch "$RUN/qmp-poll.stop"
    wait "$QMP_POLL_PID" 2>/dev/null || true
    QMP_POLL_PID=""
    KILLRES=${KILLRES:-ok}
}
# per_page_messages: socket messages per page read, from the two status lines count_reads asked
per_page_messages() {
    python3 - "$FIRST_BACKEND_LOG" $((3 * DISK_MB * 256)) <<'EOF'
import re, sys
lines = [l for l in open(sys.argv[1], errors="replace") if "status: state" in l][:2]
def counts(line):
    get = lambda pat: int(re.search(pat, line).group(1))
    region = re.search(r"shared region: \d+ posted writes, (\d+) translations", line)
    return (get(r"(\d+) messages \("), get(r"(\d+) translations"),
            get(r"(\d+) backend-channel messages"), int(region.group(1)) if region else 0)
if len(lines) == 2:
    (m0, t0, c0, r0), (m1, t1, c1, r1) = counts(lines[0]), counts(lines[1])
    pages = int(sys.argv[2])
    print("e2e: per 4 KiB page read: %.4f socket messages (%.4f TRANSLATE, %.4f backend-channel),"
          " %.4f translations in the shared region"
          % ((m1 - m0 + c1 - c0) / pages, (t1 - t0 - (r1 - r0)) / pages, (c1 - c0) / pages,
             (r1 - r0) / pages))
else:
    print("e2e: per 4 KiB page read: ? (no status lines at the marks)")
EOF
}
# count_reads: the backend's status line (SIGUSR1) at the guest's marks around the disk reads
count_reads() {
    wait_line 600 '^E2E-MARK read-start' "$RUN/console.raw" || return 0
    kill -USR1 "$BACKEND_PID" 2>/dev/null || return 0
    wait_line 600 '^E2E-MARK read-end' "$RUN/console.raw" || return 0
    kill -USR1 "$BACKEND_PID" 2>/dev/null || return 0
    sleep 0.2
}
RESTART=""
AT_RESTART=0
KILLRES=""
OUTAGES=()
WINDOWS=()
KILL_AT=()
BURST=""
QMP_POLL_PID=""
if [ "$MODE" = user ] && [ -n "$BOOT" ]; then
    count_reads
    restart_backend
    if [ "$KILL_RESUME" = 1 ] && [ "$RESTART" = ok ]; then
        S_KILL=$EPOCHREALTIME
        kill_resume
        echo "TIME $(since "$S_KILL") s: kill-resume (${#OUTAGES[@]} kills)" >&2
    fi
fi
QEMU_RC=0
wait "$QEMU_PID" || QEMU_RC=$?
QEMU_PID=""
echo "TIME $(since "$S") s: guest (boot, tests, poweroff)" >&2
tr -d '\r' <"$RUN/console.raw" >"$CONSOLE"

# guest VAR MARKER: VAR = the rest of the console line starting with MARKER (the last one)
guest() { printf -v "$1" '%s' "$(sed -n "s/^$2 *//p" "$CONSOLE" | tail -n1)"; }
guest UPTIME 'E2E-INIT uptime='
guest MBPS 'E2E-DISK-MBPS'
why="QEMU exit status $QEMU_RC"
[ "$QEMU_RC" != 124 ] || why="QEMU timed out after $TIMEOUT s"
for name in "${GUEST_TESTS[@]}"; do
    result=$(grep -E "^E2E-RESULT (ok|FAIL) $name(:|\$)" "$CONSOLE" | tail -n1 || true)
    if [ "$name" = backend-restart ] && [ "$result" = "E2E-RESULT ok $name" ]; then
        if [ "$RESTART" != ok ]; then
            result="E2E-RESULT FAIL $name: ${RESTART:-the restart did not happen}"
        elif [ "$(grep -c '^E2E-LOOP ' "$CONSOLE")" -le "$AT_RESTART" ]; then
            result="E2E-RESULT FAIL $name: no read after the restart"
        else
            note "backend restarted after the guest's read $AT_RESTART of $RESTART_LOOPS"
        fi
    fi
    case "$result" in
    "E2E-RESULT ok $name") pass "$name" ;;
    "E2E-RESULT FAIL $name: "*) fail "$name" "${result#*: }" ;;
    *)
        if [ -z "$UPTIME" ]; then
            fail "$name" "the guest did not reach its init ($why)"
        else
            fail "$name" "no result from the guest ($why)"
        fi ;;
    esac
done
if [ "${KILL_RESUME:-0}" = 1 ]; then
    # the QMP samples, and how many fell within an outage
    read -r SAMPLES NOT_RUNNING STOPS IN_OUTAGES < <(awk -v w="${WINDOWS[*]}" '
        BEGIN { n = split(w, ws, " "); for (i = 1; i <= n; i++) { split(ws[i], ab, ":"); a[i] = ab[1]; b[i] = ab[2] } }
        $1 == "event" { if ($2 == "STOP") stops++; next }
        { samples++; if ($3 != "running") bad++
          for (i = 1; i <= n; i++) if ($1 <= b[i] && $2 >= a[i]) { during++; break } }
        END { print samples + 0, bad + 0, stops + 0, during + 0 }' "$RUN/qmp-status.log" 2>/dev/null || echo "0 0 0 0")
    LAST_LOOP=$(grep -c '^E2E-LOOP ' "$CONSOLE" || true)
    BAD_LOOPS=$(awk -v from="${KILL_AT[0]:-0}" '/^E2E-LOOP / && $2 > from && $3 != "ok"' "$CONSOLE" | wc -l)
    PANICS=$(cat "$LOGS"/backend.log.kill* 2>/dev/null | grep -c panicked || true)
    echo "e2e: kill -9 outages (ms): ${OUTAGES[*]:-none}"
    echo "e2e: kill-resume: ${#OUTAGES[@]} kills at the guest's reads ${KILL_AT[*]:-none} of $RESTART_LOOPS (the last during a burst of ${BURST:-?} commands), $SAMPLES query-status samples ($IN_OUTAGES during the outages), $NOT_RUNNING not running, $STOPS STOP events"
    if [ -z "$KILLRES" ]; then
        fail kill-resume "it did not run (${RESTART:-the guest did not boot})"
    elif [ "$KILLRES" != ok ]; then
        fail kill-resume "$KILLRES"
    elif [ "$SAMPLES" = 0 ] || [ "$NOT_RUNNING" != 0 ] || [ "$STOPS" != 0 ]; then
        fail kill-resume "the VM did not keep running: $SAMPLES query-status samples, $NOT_RUNNING not running, $STOPS STOP events (log $RUN/qmp-status.log)"
    elif [ "$BAD_LOOPS" != 0 ]; then
        fail kill-resume "$BAD_LOOPS of the guest's reads from the first kill on returned wrong data"
    elif [ "$LAST_LOOP" -le "${KILL_AT[5]}" ]; then
        fail kill-resume "no read after the last kill (read ${KILL_AT[5]} of $LAST_LOOP)"
    elif [ "$PANICS" != 0 ]; then
        fail kill-resume "a resumed viommu-backend panicked (logs $LOGS/backend.log.kill*)"
    else
        pass kill-resume
    fi
fi
if grep -q '^E2E-END' "$CONSOLE" && [ "$QEMU_RC" = 0 ]; then
    pass shutdown
else
    fail shutdown "$(grep -q '^E2E-END' "$CONSOLE" && echo "the guest finished" || echo "the guest did not finish"), $why"
fi

if [ -n "$BACKEND_PID" ]; then
    rc=""
    if kill -0 "$BACKEND_PID" 2>/dev/null; then
        kill -TERM "$BACKEND_PID"
        for _ in $(seq 100); do
            kill -0 "$BACKEND_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$BACKEND_PID" 2>/dev/null; then
            kill -KILL "$BACKEND_PID" 2>/dev/null || true
            rc=timeout
        fi
        status=0
        wait "$BACKEND_PID" || status=$?
        rc=${rc:-$status}
        BACKEND_PID=""
        if [ "$rc" = timeout ]; then
            fail backend "viommu-backend did not exit within 10 s of SIGTERM (log $BACKEND_LOG)"
        elif [ "$rc" != 0 ]; then
            fail backend "viommu-backend exited with status $rc on SIGTERM (log $BACKEND_LOG)"
        elif grep -q 'panicked' "$BACKEND_LOG"; then
            fail backend "viommu-backend panicked (log $BACKEND_LOG)"
        else
            # The devices' DMA really went through the daemon: the session's closing statistics
            stats=$(grep -o 'session statistics: [0-9]* messages, [0-9]* refused, [0-9]* translations' "$BACKEND_LOG" | tail -n1 || true)
            if ! [[ $stats =~ ([0-9]+)\ messages,\ ([0-9]+)\ refused,\ ([0-9]+)\ translations ]]; then
                fail backend "no session statistics in the backend log (log $BACKEND_LOG)"
            elif messages=${BASH_REMATCH[1]} refused=${BASH_REMATCH[2]} translations=${BASH_REMATCH[3]} &&
                [ "$refused" != 0 ] || [ "$translations" = 0 ]; then
                fail backend "the session refused $refused messages and answered $translations translations (log $BACKEND_LOG)"
            else
                echo "e2e: backend: $messages messages, $translations translations"
                per_page_messages
                pass backend
            fi
        fi
    else
        wait "$BACKEND_PID" || rc=$?
        BACKEND_PID=""
        fail backend "viommu-backend died during the run with status ${rc:-0} (log $BACKEND_LOG)"
    fi
fi

if [ "$FAILED" != 0 ]; then
    echo "---- guest console tail ($CONSOLE) ----"
    tail -n 40 "$CONSOLE"
    echo "---- QEMU stderr ($QEMU_LOG) ----"
    tail -n 10 "$QEMU_LOG"
    [ -z "$BACKEND" ] || { echo "---- backend log ($BACKEND_LOG) ----"; tail -n 15 "$BACKEND_LOG"; }
    echo "----"
fi
echo "e2e: mode=$MODE boot=${BOOT:-?} s (guest uptime ${UPTIME:-?} s) disk-read=${MBPS:-?} MB/s"
echo "TIME $(since "$T0") s: total" >&2
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ] && [ "$PASSED" -gt 0 ]
