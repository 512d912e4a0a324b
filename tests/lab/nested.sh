#!/usr/bin/env bash
# The nested lab: the product's own path on real KVM. L0 (this x86 host, QEMU 10.0 under TCG)
# runs L1, the labs' arm64 Linux 7.3 at EL2 with KVM, iommufd and L0's nested-capable SMMUv3;
# L1 hands L0's virtio-net (iommu_platform=on) to vfio-pci and boots L2 under KVM with that NIC
# passed through behind a vSMMU whose stage 1 L2 owns, over L1's stage 2:
#
#   reference   QEMU's own accelerated vSMMU (-device arm-smmuv3,accel=on), from Debian's arm64
#               QEMU 11.1 (trixie-backports, fetched here), or from QEMU_AARCH64 when given
#   delegated   the vSMMU served by viommu-backend in L1 (-device arm-smmuv3,viommu=,accel=on) in
#               QEMU_AARCH64, an arm64 build of QEMU with qemu-patches/ (qemu-patches/README.md says
#               how to cross-build one); L2 also gets an emulated virtio-blk disk behind the same
#               vSMMU. Without QEMU_AARCH64 the lane is skipped.
#
# Checks, in L1 and L2: KVM and iommufd in L1; L2's arm-smmu-v3 probes the vSMMU; the NIC sits in
# a translated DMA domain; a nested HWPT was installed for it; DHCP and 100 pings work (DMA both
# ways through L2's stage 1 over L1's stage 2); MSI-X vectors fire in L2 and on L1's vfio-msix;
# L2's invalidations reach L1's kernel (IOMMU_HWPT_INVALIDATE ioctls, counted per 100 packets);
# QEMU exits cleanly; delegated: the disk reads back right and the backend holds nothing after.
#
# usage: tests/lab/nested.sh reference|delegated [--prepare-only]
# env:
#   QEMU_AARCH64          arm64 qemu-system-aarch64 for L1 (delegated: required, with qemu-patches/)
#   QEMU_AARCH64_SYSROOT  where its shared libraries are (default /: Debian's arm64 multiarch dirs)
#   VIOMMU_NESTED_CACHE   cache dir outside the repo (default /var/cache/viommu-nested)
#   VIOMMU_LAB_CACHE      the kernel lab's cache: its kernel, busybox and arm64 viommu-backend
#                         (tests/lab/run.sh --prepare-only makes them; default /var/cache/viommu-lab-ci)
#   VIOMMU_NESTED_TIMEOUT seconds L1 may run (default 600)
#
# Output: a check per line (`ok   ...` / `FAIL ...`), a `nested-metrics` line, then
# `N passed, M failed` (stdout); step timings as `TIME <s> s: <step>` on stderr. Exit status: 0
# all passed, 1 tests failed, 2 ERROR, 77 SKIPPED (a missing prerequisite, one `SKIPPED:` line).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${VIOMMU_NESTED_CACHE:-/var/cache/viommu-nested}
LAB_CACHE=${VIOMMU_LAB_CACHE:-/var/cache/viommu-lab-ci}
TIMEOUT=${VIOMMU_NESTED_TIMEOUT:-600}
EFI_FW=/usr/share/qemu-efi-aarch64/QEMU_EFI.fd
# shellcheck source=tests/lib/common.sh
source "$REPO/tests/lib/common.sh"
LANE=${1:-}
shift || true
case "$LANE" in
reference | delegated) ;;
-h | --help) prepare_only_args --help ;;
*) echo "ERROR: usage: $0 reference|delegated [--prepare-only]"; exit 2 ;;
esac
prepare_only_args "$@"
note() { echo "nested: $*" >&2; }

# ---- 0. cache, lock, the QEMU for L1 (fail fast) ----------------------------------------------
open_cache VIOMMU_NESTED_CACHE nested
if [ "$LANE" = delegated ] && [ -z "${QEMU_AARCH64:-}" ]; then
    skip "the delegated lane needs QEMU_AARCH64, an arm64 qemu-system-aarch64 built with qemu-patches/ (qemu-patches/README.md: cross-building it)"
fi
is_aarch64_elf() { [ "$(od -An -tx1 -N4 "$1" | tr -d ' ')" = 7f454c46 ] && [ "$(od -An -tu2 -j18 -N2 "$1" | tr -d ' ')" = 183 ]; }
if [ -n "${QEMU_AARCH64:-}" ]; then
    if [ ! -f "$QEMU_AARCH64" ] || ! is_aarch64_elf "$QEMU_AARCH64"; then
        skip "QEMU_AARCH64=$QEMU_AARCH64 is not an aarch64 ELF executable"
    fi
fi

# ---- 1. the kernel lab's preparation: kernel, busybox, arm64 viommu-backend, host packages -----
t "the kernel lab's preparation (tests/lab/run.sh --prepare-only)" logged lab-prepare \
    env VIOMMU_LAB_CACHE="$LAB_CACHE" bash "$HERE/run.sh" --prepare-only && lab_rc=0 || lab_rc=$?
case "$lab_rc" in
0) ;;
77) skip "the kernel lab cannot be prepared: $(grep -h '^SKIPPED:' "$LOGS/lab-prepare.log" | sed 's/^SKIPPED: //')" ;;
*) tail_log lab-prepare 20; error "tests/lab/run.sh --prepare-only failed (log $LOGS/lab-prepare.log)" ;;
esac
# shellcheck disable=SC1091  # written by run.sh --prepare-only
source "$LAB_CACHE/prepared.env"
for f in "$LAB_IMAGE" "$LAB_BUSYBOX" "$LAB_BACKEND"; do [ -f "$f" ] || error "the lab prepared no $f"; done
[ -f "$EFI_FW" ] || skip "UEFI firmware $EFI_FW missing (package qemu-efi-aarch64)"
command -v aarch64-linux-gnu-readelf >/dev/null || skip "no aarch64-linux-gnu-readelf (package binutils-aarch64-linux-gnu)"
L0_QEMU_VERSION=$(qemu-system-aarch64 --version | head -n1)

# ---- 2. the QEMU L1 runs, with its shared libraries -----------------------------------------
# closure BINARY SYSROOT: BINARY's NEEDED libraries, recursively, found in SYSROOT's arm64 dirs
closure() {
    local todo=("$1") seen=" " f lib path dir
    while [ ${#todo[@]} -gt 0 ]; do
        f=${todo[0]}
        todo=("${todo[@]:1}")
        for lib in $(aarch64-linux-gnu-readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
            case "$seen" in *" $lib "*) continue ;; esac
            seen="$seen$lib "
            path=""
            for dir in lib/aarch64-linux-gnu usr/lib/aarch64-linux-gnu; do
                [ -e "$2/$dir/$lib" ] && { path=$2/$dir/$lib; break; }
            done
            [ -n "$path" ] || error "$1 needs $lib, which is not under $2/{,usr/}lib/aarch64-linux-gnu"
            echo "$path"
            todo+=("$path")
        done
    done
    for dir in lib/aarch64-linux-gnu usr/lib/aarch64-linux-gnu; do
        [ -e "$2/$dir/ld-linux-aarch64.so.1" ] && { echo "$2/$dir/ld-linux-aarch64.so.1"; return; }
    done
    error "no ld-linux-aarch64.so.1 under $2"
}
# Debian's arm64 QEMU 11.1 (trixie-backports) and its libraries, through a private apt
# configuration (the host's apt is untouched), unpacked once per version.
debian_qemu() {
    local a=$CACHE/apt ver dir debs
    mkdir -p "$a"/{lists/partial,cache/archives/partial,etc/preferences.d,etc/sources.list.d}
    touch "$a/status"
    cat >"$a/etc/sources.list" <<EOS
deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main
EOS
    printf 'Package: *\nPin: release n=trixie-backports\nPin-Priority: 990\n' >"$a/etc/preferences.d/backports"
    cat >"$a/apt.conf" <<EOS
Dir::Etc "$a/etc"; Dir::Etc::SourceParts "$a/etc/sources.list.d"; Dir::State::Lists "$a/lists";
Dir::State::status "$a/status"; Dir::Cache "$a/cache"; APT::Architecture "arm64";
APT::Architectures { "arm64"; }; APT::Sandbox::User "root";
EOS
    export APT_CONFIG=$a/apt.conf
    t "apt-get update (arm64 trixie, private)" logged apt-arm64 apt-get -q update ||
        note "WARNING: apt-get update for arm64 trixie failed; using what is cached"
    ver=$(candidate qemu-system-arm)
    [[ -n $ver && $ver != "(none)" ]] || skip "Debian's arm64 qemu-system-arm is not available from trixie-backports"
    dir=$CACHE/qemu-debian/$(safe "$ver")
    if [ ! -x "$dir/root/usr/bin/qemu-system-aarch64" ]; then
        debs=$(tmpdir)
        (
            cd "$debs"
            apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
                --no-replaces --no-enhances --no-pre-depends qemu-system-arm 2>/dev/null |
                grep -v '^[ <]' | sort -u >closure.txt
            # shellcheck disable=SC2046  # a word list of package names
            apt-get -q download $(grep -E '^(lib.*|zlib1g)$' closure.txt) qemu-system-arm qemu-system-common
        ) >"$LOGS/download-qemu-debian.log" 2>&1 ||
            { tail_log download-qemu-debian 10; skip "cannot download Debian's arm64 qemu-system-arm $ver"; }
        mkdir -p "$debs/root"
        for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$debs/root"; done
        rm -rf "$dir"
        mkdir -p "$(dirname "$dir")"
        mkdir "$dir" && mv "$debs/root" "$dir/root"
    fi
    unset APT_CONFIG
    QEMU_L1=$dir/root/usr/bin/qemu-system-aarch64
    SYSROOT=$dir/root
}
if [ -n "${QEMU_AARCH64:-}" ]; then
    QEMU_L1=$QEMU_AARCH64
    SYSROOT=${QEMU_AARCH64_SYSROOT:-/}
else
    debian_qemu
fi
LIBS=$(closure "$QEMU_L1" "$SYSROOT")
note "L1's QEMU: $QEMU_L1 ($(wc -l <<<"$LIBS") libraries from $SYSROOT)"

# ---- 3. initramfs of L2 and L1, L1's IORT with CANWBS ------------------------------------------
# shellcheck disable=SC2054  # the commas belong to QEMU option values
L1_ARGS=(-M virt,gic-version=3,iommu=smmuv3,virtualization=on -cpu max,pauth-impdef=on -smp 2 -m 2G
    -accel tcg,thread=multi -nographic -no-reboot -nic none -bios "$EFI_FW"
    -device virtio-net-pci,netdev=n0,iommu_platform=on,disable-legacy=on,romfile= -netdev user,id=n0)
L1_APPEND="console=ttyAMA0 panic=-1 acpi=force"
boot_l1() { # boot_l1 INITRD LOG ARGS: L1 under L0, console into LOG
    timeout -k 10 "$TIMEOUT" nice -n 5 qemu-system-aarch64 "${L1_ARGS[@]}" -kernel "$LAB_IMAGE" \
        -initrd "$1" -append "$L1_APPEND $3" </dev/null >"$2" 2>&1
}
W=$(tmpdir)
mkdir -p "$W/l2/"{bin,proc,sys,dev,tmp}
cp "$LAB_BUSYBOX" "$W/l2/bin/busybox"
cp "$HERE/nested/l2-init" "$W/l2/init"
chmod 755 "$W/l2/init"
(cd "$W/l2" && find . | cpio -o -H newc -R 0:0 --quiet | gzip -1) >"$W/l2-initrd.gz"
R=$W/l1
mkdir -p "$R/"{bin,proc,sys,dev,tmp,l1,l2,usr/bin,lib/aarch64-linux-gnu}
cp "$LAB_BUSYBOX" "$R/bin/busybox"
cp "$HERE/nested/l1-init" "$R/init"
chmod 755 "$R/init"
cp "$QEMU_L1" "$R/usr/bin/qemu-system-aarch64"
while read -r lib; do cp -L "$lib" "$R/lib/aarch64-linux-gnu/"; done <<<"$LIBS"
ln -s aarch64-linux-gnu/ld-linux-aarch64.so.1 "$R/lib/ld-linux-aarch64.so.1"
mkdir -p "$R/usr/lib" && ln -s ../../lib/aarch64-linux-gnu "$R/usr/lib/aarch64-linux-gnu"
cp "$EFI_FW" "$R/l2/QEMU_EFI.fd"
cp "$LAB_IMAGE" "$R/l2/Image"
cp "$W/l2-initrd.gz" "$R/l2/initrd.gz"
if [ "$LANE" = delegated ]; then
    cp "$LAB_BACKEND" "$R/l1/viommu-backend"
    # 4 MiB L2 reads back through the vSMMU: the same bytes on every run.
    python3 -c 'import random, sys; sys.stdout.buffer.write(random.Random(16).randbytes(4 << 20))' >"$R/l2/disk.img"
fi
(cd "$R" && find . | cpio -o -H newc -R 0:0 --quiet) >"$W/l1-initrd.cpio"
note "L1 initramfs: $(du -m "$W/l1-initrd.cpio" | cut -f1) MiB"

EDK2_VERSION=$(dpkg-query -W -f '${Version}' qemu-efi-aarch64)
IORT_KEY=$(printf '%s\n' "$L0_QEMU_VERSION" "qemu-efi-aarch64 $EDK2_VERSION" "${L1_ARGS[*]}" | sha)
IORT_DIR=$CACHE/iort/$IORT_KEY
if [ ! -f "$IORT_DIR/acpi.cpio" ]; then
    mkdir -p "$W/small/"{bin,proc,sys,dev,tmp} "$W/iort/acpi/kernel/firmware/acpi"
    cp "$LAB_BUSYBOX" "$W/small/bin/busybox"
    cp "$HERE/nested/l1-init" "$W/small/init"
    chmod 755 "$W/small/init"
    (cd "$W/small" && find . | cpio -o -H newc -R 0:0 --quiet | gzip -1) >"$W/small.gz"
    t "boot L1 to dump its IORT" boot_l1 "$W/small.gz" "$LOGS/dumpiort.log" nested.run=dumpiort ||
        { tail_log dumpiort 20; error "L1 boot to dump the IORT failed ($L0_QEMU_VERSION)"; }
    tr -d '\r' <"$LOGS/dumpiort.log" | sed -n '/^IORT-BEGIN/,/^IORT-END/p' | sed '1d;$d' | base64 -d >"$W/iort/iort-orig.aml" ||
        { tail_log dumpiort 20; error "no IORT in L1's dump"; }
    python3 "$HERE/patch-iort.py" "$W/iort/iort-orig.aml" "$W/iort/acpi/kernel/firmware/acpi/iort.aml" >&2 ||
        error "patching L1's IORT failed"
    (cd "$W/iort/acpi" && find kernel | cpio -o -H newc -R 0:0 --quiet) >"$W/iort/acpi.cpio"
    mkdir -p "$CACHE/iort" && rm -rf "$IORT_DIR" && mv "$W/iort" "$IORT_DIR"
fi
cat "$IORT_DIR/acpi.cpio" "$W/l1-initrd.cpio" >"$W/l1-initrd-acpi.cpio"   # uncompressed cpio first
note "kernel key $LAB_KERNEL_KEY, IORT key $IORT_KEY, $L0_QEMU_VERSION"
if [ "$PREPARE_ONLY" = 1 ]; then
    echo "TIME $(since "$T0") s: total (prepare only)" >&2
    exit 0
fi

# ---- 4. run the lane --------------------------------------------------------------------------
CONSOLE=$LOGS/console-$LANE.log
L1_RC=0
t "L1 and L2 ($LANE lane)" boot_l1 "$W/l1-initrd-acpi.cpio" "$CONSOLE.raw" "quiet nested.lane=$LANE" || L1_RC=$?
tr -d '\r' <"$CONSOLE.raw" | sed 's/^\[ *[0-9.]*\] //' >"$CONSOLE" && rm -f "$CONSOLE.raw"
# The console, cut at each `L1-VARIANT`: L1's own lines first, then one part per L2.
PARTS=$(tmpdir)
awk -v dir="$PARTS" '/^L1-VARIANT / { part = dir "/" $2; print > part; next }
    { print > (part ? part : dir "/l1") }' "$CONSOLE"
LOG=$PARTS/l1
val() { sed -n "s/^$1 //p" "$LOG" | tail -n 1; }
PASSED=0
FAILED=0
NAME=$LANE
check() { # check NAME CONDITION...: one result line
    local name=$1
    shift
    if "$@"; then
        PASSED=$((PASSED + 1))
        echo "ok   $NAME: $name"
    else
        FAILED=$((FAILED + 1))
        echo "FAIL $NAME: $name"
    fi
}
has() { grep -q "^$1" "$LOG"; }
is() { [ "$(val "$1")" = "$2" ]; }
at_least() { local v; v=$(val "$1"); [[ $v =~ ^[0-9]+$ ]] && [ "$v" -ge "$2" ]; }
translated() { [[ $(val "$1") =~ ^DMA ]]; }
num() { [[ ${1:-} =~ ^[0-9]+$ ]] && echo "$1" || echo -1; }
kvm_ready() { is L1-KVM yes && is L1-IOMMUFD yes && is L1-IORT canwbs; }
check "L1 runs KVM at EL2 with iommufd and the CANWBS IORT" kvm_ready
check "L0's virtio-net bound to vfio-pci in L1" is L1-VFIO vfio-pci
DISK_SUM=$(val L1-DISK-SUM)
VARIANTS=(direct)
[ "$LANE" = reference ] || VARIANTS=(direct translate killed)
for VARIANT in "${VARIANTS[@]}"; do
    NAME="$LANE, MSI $VARIANT"
    LOG=$PARTS/$VARIANT
    touch "$LOG"
    read -r _ INV0 _ CMD0 VIRQ0 <<<"$(grep '^L1-PING-START' "$LOG" | tail -n1)" || true
    read -r _ INV1 _ CMD1 VIRQ1 <<<"$(grep '^L1-PING-END' "$LOG" | tail -n1)" || true
    read -r _ INV_TOTAL STE_TOTAL _ <<<"$(grep '^L1-HOST-TOTAL' "$LOG" | tail -n1)" || true
    read -r _ ROUTES DIRECT <<<"$(grep '^L1-MSI-ROUTES' "$LOG" | tail -n1)" || true
    INV_PING=$(($(num "${INV1:-}") - $(num "${INV0:-}")))
    CMD_PING=$(($(num "${CMD1:-}") - $(num "${CMD0:-}")))
    VIRQ_PING=$(($(num "${VIRQ1:-}") - $(num "${VIRQ0:-}")))
    L2_BOOT=$(awk -v a="$(val L1-L2-START)" -v b="$(val L1-L2-INIT)" 'BEGIN { if (a != "" && b != "") printf "%.1f", b - a; else print "none" }')
    smmu_probed() { has L2-INIT && is L2-SMMU probed; }
    # (after a kill the new backend adopts the nested HWPT rather than installs one)
    hwpt_installed() { [ "$(num "${STE_TOTAL:-}")" -gt 0 ] || { [ "$VARIANT" = killed ] && grep -q '^L1-RESUME-LOG .*adopted (vDEVICE Some([0-9]*), HWPT Some([0-9]*))' "$LOG"; }; }
    msix_fire() { at_least L2-PING-IRQS 1 && at_least L2-MSIX 1 && [ "$VIRQ_PING" -gt 0 ]; }
    invalidations_reach() { [ "$(num "${INV_TOTAL:-}")" -gt 0 ]; }
    msi_mode() { # delegated: the routes took msi-gpa's doorbell, or none did
        [ "$(num "${ROUTES:-}")" -gt 0 ] || return 1
        if [ "$VARIANT" = translate ]; then [ "$(num "${DIRECT:-}")" = 0 ]; else [ "$(num "${DIRECT:-}")" -gt 0 ]; fi
    }
    resumed() { # the backend killed as the pings started; the next one resumed and adopted all
        has L1-KILLED && has L1-RESTARTED &&
            grep -q '^L1-RESUME-LOG .*vSMMU resumed from the shared region' "$LOG" &&
            grep -q '^L1-RESUME-LOG .*adopted with the fd the frontend held' "$LOG" &&
            grep -q '^L1-RESUME-LOG .*passthrough device [0-9]*: adopted' "$LOG" &&
            ! grep -q '^L1-RESUME-LOG .*host events may have been lost' "$LOG"
    }
    disk_reads_back() { translated L2-BLK-DOMAIN && [ -n "$DISK_SUM" ] && [ "$(val L2-BLK-SUM)" = "$DISK_SUM" ]; }
    backend_clean() { is L1-BACKEND-IOMMUFDS 0 && at_least L1-BACKEND-DESTROYED 1; }
    check "L2 booted under KVM and its arm-smmu-v3 probed the vSMMU" smmu_probed
    check "a nested HWPT was installed for the NIC" hwpt_installed
    check "the NIC is in a translated DMA domain in L2" translated L2-NET-DOMAIN
    check "DHCP and 100 pings through L2's stage 1 over L1's stage 2" at_least L2-PING-RECEIVED 95
    check "MSI-X vectors fire in L2 and on L1's vfio-msix" msix_fire
    # (after a kill the new backend counts afresh: the total is its own)
    check "L2's invalidations reach L1's kernel (IOMMU_HWPT_INVALIDATE)" invalidations_reach
    check "L2 shut down and QEMU exited cleanly" is L1-QEMU-EXIT 0
    if [ "$VARIANT" = killed ]; then
        check "backend killed (SIGKILL) as the pings began: a new one resumed the vSMMU and adopted the NIC and its vEVENTQ" resumed
    fi
    if [ "$LANE" = delegated ]; then
        check "KVM's MSI routes $([ "$VARIANT" = translate ] && echo "translate the gIOVA through the vSMMU" || echo "take msi-gpa's doorbell")" msi_mode
        check "the emulated virtio-blk behind the same vSMMU reads back right" disk_reads_back
        check "the backend tore the session down and holds no iommufd" backend_clean
    fi
    echo "nested-metrics lane=$LANE msi=$VARIANT l2_boot_s=$L2_BOOT ping_p50_ms=$(val L2-PING-P50) ping_received=$(val L2-PING-RECEIVED) inval_ioctls_per_100_packets=$INV_PING inval_commands_per_100_packets=$CMD_PING l2_irqs_per_100_packets=$(val L2-PING-IRQS) l1_vfio_irqs_per_100_packets=$VIRQ_PING nested_hwpts=$(num "${STE_TOTAL:-}") inval_ioctls_total=$(num "${INV_TOTAL:-}") msi_routes=$(num "${ROUTES:-}") msi_direct=$([ "$LANE" = delegated ] && num "${DIRECT:-}" || echo n/a)"
done
if [ "$LANE" = delegated ]; then
    LOG=$PARTS/${VARIANTS[-1]}
    NAME=$LANE
    backend_exit() { is L1-BACKEND-EXIT 0 && ! grep -qE '^L1-BACKEND-LOG .*(ERROR|panicked)' "$LOG"; }
    check "the backend exited cleanly (SIGTERM) with no error logged" backend_exit
fi
echo "TIME $(since "$T0") s: total" >&2
if [ $((PASSED + FAILED)) -gt 0 ] && [ "$FAILED" -gt 0 ]; then
    echo "---- L1 console tail ($CONSOLE; L0 exit status $L1_RC) ----"
    tail -n 40 "$CONSOLE"
    echo "----"
fi
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
