#!/usr/bin/env bash
# The viommu-user kernel lab: runs the lab tests (tests/src/bin/viommu-lab.rs) against a real Linux
# iommufd + ARM SMMUv3 nesting stack, inside an arm64 Linux 7.3 guest under QEMU 10.0 (TCG), on a
# Debian 12 (bookworm) x86_64 host. Everything comes from Debian's archive.
#
# usage: tests/lab/run.sh [--prepare-only]
#   --prepare-only   install, download, build the kernel, the IORT override and both aarch64
#                    binaries (viommu-lab only if it exists yet), but do not boot the lab; write
#                    what was prepared to $VIOMMU_LAB_CACHE/prepared.env (tests/lab/nested.sh)
# env:
#   VIOMMU_LAB_CACHE    cache dir outside the repo (default /var/cache/viommu-lab-ci)
#   VIOMMU_LAB_TIMEOUT  seconds the lab guest may run (default 600)
#   VIOMMU_LAB_RUST_SRC Debian rust-src version whose std is rebuilt for aarch64; its upstream
#                       part must equal `rustc --version` (default 1.95.0+dfsg1-2~bpo13+1)
#   VIOMMU_LAB_ARGS     extra arguments for viommu-lab in the guest (word-split)
#   RUST_LOG            passed to the guest when set
#
# Output: the lab program's output, then a last line `N passed, M failed` (stdout); step timings
# as `TIME <s> s: <step>` on stderr. A missing prerequisite prints one line starting with
# `SKIPPED:` (the machine cannot provide it) or `ERROR:` (something broke) and no result line.
# Exit status: 0 all passed (N > 0, M = 0); 1 tests failed or no result; 2 ERROR; 77 SKIPPED.
#
# Cache layout ($VIOMMU_LAB_CACHE):
#   kernel/<sha256(kernel.config + linux-source version)>/Image   guest kernel (+ .config)
#   iort/<sha256(QEMU version + edk2 version + QEMU args)>/acpi.cpio   CANWBS IORT override
#   linux-source/<ver>/  busybox/<ver>/  rust-src/<ver>/          unpacked Debian packages
#   target-aarch64/      CARGO_TARGET_DIR of the aarch64 build (std rebuilt once, incremental)
#   logs/                step logs and the last guest console (console.log)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${VIOMMU_LAB_CACHE:-/var/cache/viommu-lab-ci}
TIMEOUT=${VIOMMU_LAB_TIMEOUT:-600}
RUST_SRC_VERSION=${VIOMMU_LAB_RUST_SRC:-1.95.0+dfsg1-2~bpo13+1}
TARGET=aarch64-unknown-linux-gnu
EFI_FW=/usr/share/qemu-efi-aarch64/QEMU_EFI.fd
LINUX_SOURCE=linux-source-7.3
# shellcheck disable=SC2054  # the commas belong to QEMU option values
QEMU_ARGS=(-M virt,gic-version=3,iommu=smmuv3 -cpu max,pauth-impdef=on -smp 2 -m 1G
    -accel tcg,thread=multi -bios "$EFI_FW" -device edu -nographic -no-reboot -nic none)
KERNEL_APPEND="console=ttyAMA0 panic=-1 acpi=force"

# ---- arguments and the shared helpers -------------------------------------------------------
# shellcheck source=tests/lib/common.sh
source "$HERE/../lib/common.sh"
prepare_only_args "$@"
note() { echo "lab: $*" >&2; }

# ---- 0. cache dir, toolchain (fail fast, before anything expensive) --------------------------
open_cache VIOMMU_LAB_CACHE lab
echo "lab: cache $CACHE" >&2

[ -d "$HOME/.cargo/bin" ] && PATH=$HOME/.cargo/bin:$PATH
if ! command -v cargo >/dev/null || ! command -v rustc >/dev/null; then
    skip "no Rust toolchain (cargo, rustc) on PATH"
fi
RUSTC_VERSION=$(rustc --version | awk '{ print $2 }')
[ "$RUSTC_VERSION" = "${RUST_SRC_VERSION%%+*}" ] ||
    skip "rustc is $RUSTC_VERSION but Debian rust-src is $RUST_SRC_VERSION: std for aarch64 is rebuilt from rust-src and the versions must be equal (set VIOMMU_LAB_RUST_SRC to the matching version from 'apt-cache madison rust-src')"

# ---- 1. host packages (idempotent) -----------------------------------------------------------
# shellcheck disable=SC1091
OS=$(. /etc/os-release 2>/dev/null && echo "${ID:-}:${VERSION_CODENAME:-}")
[ "$OS" = debian:bookworm ] || skip "host is '$OS', the lab needs Debian 12 (bookworm) with apt"
[ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null || skip "not root and no password-less sudo: cannot install packages"
lab_apt_sources
APT_OFFLINE=""
if ! t "apt-get update" logged apt-update as_root apt-get update; then
    APT_OFFLINE=" (apt-get update failed: no network to the Debian archive?)"
    echo "lab: WARNING: apt-get update failed; continuing with installed and cached packages" >&2
fi
export DEBIAN_FRONTEND=noninteractive
t "apt-get install qemu-system-arm (bookworm-backports)" logged apt-qemu \
    as_root apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-arm ||
    { tail_log apt-qemu 5; skip "cannot install qemu-system-arm 10.0 from bookworm-backports$APT_OFFLINE"; }
HOST_PKGS=(qemu-efi-aarch64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc make libc6-dev
    flex bison bc cpio xz-utils gzip python3)
t "apt-get install host packages" logged apt-host as_root apt-get install -y -q --no-install-recommends "${HOST_PKGS[@]}" ||
    { tail_log apt-host 5; skip "cannot install host packages ${HOST_PKGS[*]}$APT_OFFLINE"; }
command -v qemu-system-aarch64 >/dev/null || skip "QEMU missing: no qemu-system-aarch64 after installing qemu-system-arm"
QEMU_VERSION=$(qemu-system-aarch64 --version | head -n1)
[[ $QEMU_VERSION =~ version\ ([0-9]+)\. && ${BASH_REMATCH[1]} -ge 10 ]] ||
    skip "QEMU too old: '$QEMU_VERSION' (the lab needs QEMU >= 10.0 from bookworm-backports)"
[ -f "$EFI_FW" ] || skip "UEFI firmware $EFI_FW missing (package qemu-efi-aarch64)"
echo "lab: $QEMU_VERSION; rustc $RUSTC_VERSION" >&2

# version_of VAR PKG: VAR = the candidate version of PKG in the configured archive
version_of() {
    local v
    v=$(candidate "$2")
    [[ -n $v && $v != "(none)" ]] || skip "package $2 is not available from the configured Debian archive$APT_OFFLINE"
    printf -v "$1" '%s' "$v"
}

version_of BUSYBOX_VERSION busybox-static:arm64
BUSYBOX=$CACHE/busybox/$(safe "$BUSYBOX_VERSION")/bin/busybox
t "busybox-static:arm64 $BUSYBOX_VERSION" unpack busybox-static:arm64 "$BUSYBOX_VERSION" "$CACHE/busybox/$(safe "$BUSYBOX_VERSION")"
[ -x "$BUSYBOX" ] || error "no bin/busybox in busybox-static:arm64 $BUSYBOX_VERSION"

# ---- 2. guest kernel, keyed by the config fragment and the linux-source version ---------------
version_of LINUX_VERSION "$LINUX_SOURCE"
# linux_tree VAR: VAR = the unpacked linux source tree (unpacked once, in the cache)
linux_tree() {
    printf -v "$1" '%s' "$CACHE/linux-source/$(safe "$LINUX_VERSION")"
    t "unpack $LINUX_SOURCE $LINUX_VERSION" unpack "$LINUX_SOURCE" "$LINUX_VERSION" "${!1}" untar_linux
}
guest_kernel "$REPO/tests/lib/kernel.config" tests/lib/kernel.config linux_tree

# ---- 3. Rust std from rust-src, cross-build of the binaries -----------------------------------
RUST_SRC_DIR=$CACHE/rust-src/$(safe "$RUST_SRC_VERSION")
t "rust-src $RUST_SRC_VERSION" unpack rust-src "$RUST_SRC_VERSION" "$RUST_SRC_DIR"
RUST_LIBRARY=$RUST_SRC_DIR/usr/src/rustc-$RUSTC_VERSION/library
[ -f "$RUST_LIBRARY/Cargo.lock" ] || error "rust-src $RUST_SRC_VERSION has no $RUST_LIBRARY"
TARGET_DIR=$CACHE/target-aarch64
cargo_aarch64() {
    env RUSTC_BOOTSTRAP=1 __CARGO_TESTS_ONLY_SRC_ROOT="$RUST_LIBRARY" CARGO_TARGET_DIR="$TARGET_DIR" \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
        RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --manifest-path "$REPO/Cargo.toml" --locked --release \
        -Zbuild-std=std,panic_abort --target "$TARGET" "$@"
}
is_aarch64_elf() { [ "$(od -An -tx1 -N4 "$1" | tr -d ' ')" = 7f454c46 ] && [ "$(od -An -tu2 -j18 -N2 "$1" | tr -d ' ')" = 183 ]; }
BIN_DIR=$TARGET_DIR/$TARGET/release
t "cargo build viommu-backend (aarch64)" logged cargo-backend cargo_aarch64 -p viommu-backend --bin viommu-backend ||
    { tail_log cargo-backend 25; error "cross-build of viommu-backend for $TARGET failed (log $LOGS/cargo-backend.log)"; }
is_aarch64_elf "$BIN_DIR/viommu-backend" || error "$BIN_DIR/viommu-backend is not an aarch64 ELF"
HAVE_LAB=$(cargo metadata --manifest-path "$REPO/Cargo.toml" --no-deps --format-version 1 2>/dev/null | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(int(any(t["name"] == "viommu-lab" and "bin" in t["kind"]
              for p in m["packages"] if p["name"] == "viommu-tests" for t in p["targets"])))') ||
    error "cargo metadata failed for $REPO"
if [ "$HAVE_LAB" = 1 ]; then
    t "cargo build viommu-lab (aarch64)" logged cargo-lab cargo_aarch64 -p viommu-tests --bin viommu-lab ||
        { tail_log cargo-lab 25; error "cross-build of viommu-lab for $TARGET failed (log $LOGS/cargo-lab.log)"; }
    is_aarch64_elf "$BIN_DIR/viommu-lab" || error "$BIN_DIR/viommu-lab is not an aarch64 ELF"
elif [ "$PREPARE_ONLY" = 1 ]; then
    echo "lab: no binary viommu-lab in package viommu-tests yet; not built" >&2
else
    error "no binary viommu-lab in package viommu-tests (tests/src/bin/viommu-lab.rs): nothing to run"
fi

# ---- 4. initramfs + the IORT with CANWBS, keyed by QEMU version and command line ---------------
# mkinitrd OUT [FILE...]: busybox, tests/lab/init and FILEs (into /lab) as a gzip'ed newc cpio
mkinitrd() {
    local out=$1 root
    shift
    root=$(tmpdir)
    mkdir -p "$root"/{bin,proc,sys,dev,tmp,lab}
    cp "$BUSYBOX" "$root/bin/busybox"
    cp "$HERE/init" "$root/init"
    chmod 755 "$root/init"
    [ $# -eq 0 ] || cp "$@" "$root/lab/"
    (cd "$root" && find . | cpio -o -H newc -R 0:0 --quiet | gzip -1) >"$out"
}
boot() { # boot INITRD LOG KERNEL-ARGS: the lab machine, console into LOG
    timeout -k 10 "$TIMEOUT_S" qemu-system-aarch64 "${QEMU_ARGS[@]}" -kernel "$IMAGE" -initrd "$1" \
        -append "$KERNEL_APPEND $3" </dev/null >"$2" 2>&1
}
EDK2_VERSION=$(dpkg-query -W -f '${Version}' qemu-efi-aarch64)
IORT_KEY=$(printf '%s\n' "$QEMU_VERSION" "$(dpkg-query -W -f '${Version}' qemu-system-arm)" \
    "qemu-efi-aarch64 $EDK2_VERSION" "${QEMU_ARGS[*]}" | sha)
IORT_DIR=$CACHE/iort/$IORT_KEY
make_iort() {
    local w
    w=$(tmpdir)
    mkinitrd "$w/initrd.gz"
    TIMEOUT_S=120 t "boot to dump the IORT" boot "$w/initrd.gz" "$LOGS/dumpiort.log" lab.run=dumpiort ||
        { tail_log dumpiort 20; error "guest boot to dump the IORT failed (QEMU: $QEMU_VERSION)"; }
    tr -d '\r' <"$LOGS/dumpiort.log" | sed -n '/^IORT-BEGIN/,/^IORT-END/p' | sed '1d;$d' | base64 -d >"$w/iort-orig.aml" ||
        { tail_log dumpiort 20; error "no IORT in the guest's dump"; }
    mkdir -p "$w/out/acpi/kernel/firmware/acpi"
    python3 "$HERE/patch-iort.py" "$w/iort-orig.aml" "$w/out/acpi/kernel/firmware/acpi/iort.aml" >&2 ||
        error "patching the IORT failed"
    cp "$w/iort-orig.aml" "$w/out/"
    (cd "$w/out/acpi" && find kernel | cpio -o -H newc -R 0:0 --quiet) >"$w/out/acpi.cpio"
    printf '%s\n' "$QEMU_VERSION" "qemu-efi-aarch64 $EDK2_VERSION" "${QEMU_ARGS[*]}" >"$w/out/key"
    mkdir -p "$CACHE/iort"
    rm -rf "$IORT_DIR"
    mv "$w/out" "$IORT_DIR"
}
if [ -f "$IORT_DIR/acpi.cpio" ]; then
    echo "lab: IORT override cached: $IORT_DIR/acpi.cpio" >&2
else
    make_iort
fi
echo "lab: kernel key $KERNEL_KEY ($LINUX_SOURCE $LINUX_VERSION), IORT key $IORT_KEY" >&2

if [ "$PREPARE_ONLY" = 1 ]; then
    # For the nested lab (tests/lab/nested.sh), which boots the same kernel and runs the same
    # backend: what was prepared, as shell assignments.
    printf 'LAB_IMAGE=%q\nLAB_BUSYBOX=%q\nLAB_BACKEND=%q\nLAB_KERNEL_KEY=%q\n' \
        "$IMAGE" "$BUSYBOX" "$BIN_DIR/viommu-backend" "$KERNEL_KEY" >"$CACHE/prepared.env"
    echo "TIME $(since "$T0") s: total (prepare only)" >&2
    echo "lab: prepared: $IMAGE, $IORT_DIR/acpi.cpio, $BIN_DIR/viommu-backend$([ "$HAVE_LAB" != 1 ] || echo ", $BIN_DIR/viommu-lab")"
    exit 0
fi

# ---- 5. run the lab ---------------------------------------------------------------------------
RUN=$(tmpdir)
cp "$BIN_DIR/viommu-lab" "$BIN_DIR/viommu-backend" "$RUN/"
: >"$RUN/args"
[ -z "${VIOMMU_LAB_ARGS:-}" ] || printf '%s\n' "$VIOMMU_LAB_ARGS" >"$RUN/args"
: >"$RUN/env"
[ -z "${RUST_LOG:-}" ] || printf 'export RUST_LOG=%q\n' "$RUST_LOG" >"$RUN/env"
mkinitrd "$RUN/initrd.gz" "$RUN/viommu-lab" "$RUN/viommu-backend" "$RUN/args" "$RUN/env"
cat "$IORT_DIR/acpi.cpio" "$RUN/initrd.gz" >"$RUN/initrd-acpi.img"   # uncompressed cpio first
CONSOLE=$LOGS/console.log
QEMU_RC=0
TIMEOUT_S=$TIMEOUT t "lab guest (boot, tests, poweroff)" boot "$RUN/initrd-acpi.img" "$CONSOLE.raw" "quiet lab.run=lab" || QEMU_RC=$?
tr -d '\r' <"$CONSOLE.raw" >"$CONSOLE" && rm -f "$CONSOLE.raw"

OUT=$(awk '/LAB-BEGIN/ { on = 1; next } on && /LAB-EXIT=/ { sub(/LAB-EXIT=.*/, ""); if (length($0)) print; exit } on' "$CONSOLE")
LAB_RC=$(sed -n 's/.*LAB-EXIT=\([0-9]*\).*/\1/p' "$CONSOLE" | tail -n1)
[ -z "$OUT" ] || printf '%s\n' "$OUT"
SUMMARY=$(printf '%s\n' "$OUT" | grep -E '^[0-9]+ passed, [0-9]+ failed$' | tail -n1 || true)
echo "TIME $(since "$T0") s: total" >&2
why="QEMU exit status $QEMU_RC"
[ "$QEMU_RC" != 124 ] || why="$why: timed out after $TIMEOUT s"
if [ -z "$SUMMARY" ]; then
    echo "---- guest console tail ($CONSOLE) ----"
    tail -n 40 "$CONSOLE"
    echo "----"
    echo "ERROR: the lab guest printed no 'N passed, M failed' line (viommu-lab exit status ${LAB_RC:-none}; $why)"
    echo "0 passed, 1 failed"
    exit 1
fi
PASSED=${SUMMARY%% passed*}
FAILED=${SUMMARY#*, }
FAILED=${FAILED%% failed}
if [ "$FAILED" = 0 ] && [ "${LAB_RC:-none}" != 0 ]; then
    echo "ERROR: viommu-lab reported '$SUMMARY' but exited with status ${LAB_RC:-none} ($why); counted as a failure"
    echo "$PASSED passed, 1 failed"
    exit 1
fi
[ "$PASSED" -gt 0 ] || echo "ERROR: viommu-lab ran no tests"
echo "$SUMMARY"
[ "$FAILED" = 0 ] && [ "$PASSED" -gt 0 ]
