# Shell helpers shared by the kernel lab (tests/lab/run.sh) and the end-to-end guest test
# (tests/e2e/qemu-guest.sh). Sourced, not run: the caller sets CACHE and LOGS before using
# logged, tail_log, tmpdir and unpack, APT_OFFLINE (a note for skip messages, may be empty) before
# unpack, LINUX_SOURCE (the Debian package name, linux-source-X.Y) before untar_linux, and also
# LINUX_VERSION and a note function before guest_kernel.
# shellcheck shell=bash

# prepare_only_args ARGS...: PREPARE_ONLY=1 with --prepare-only; --help prints the calling
# script's header comment
prepare_only_args() {
    # shellcheck disable=SC2034  # read by the caller
    PREPARE_ONLY=0
    local arg
    for arg in "$@"; do
        # shellcheck disable=SC2034  # PREPARE_ONLY is read by the caller
        case "$arg" in
        --prepare-only) PREPARE_ONLY=1 ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "ERROR: unknown argument '$arg' (usage: $0 [--prepare-only])"; exit 2 ;;
        esac
    done
}
skip() { echo "SKIPPED: $*"; exit 77; }
# open_cache ENV WHO: CACHE (the value of the variable named ENV) made absolute, checked to lie
# outside the checkout (REPO) and created, LOGS in it; the cache's lock taken (waiting, with a
# note, while another WHO run holds it); only then the working files an earlier run left removed,
# and removed again at exit. The lock stays on fd 9.
open_cache() {
    CACHE=$(realpath -m "$CACHE")
    case "$CACHE/" in "$(realpath "$REPO")/"*) error "$1=$CACHE is inside the repo checkout; use a dir outside it" ;; esac
    mkdir -p "$CACHE" 2>/dev/null || skip "cannot create the cache dir $CACHE (set $1)"
    LOGS=$CACHE/logs
    mkdir -p "$LOGS"
    exec 9>"$CACHE/.lock"
    if ! flock -n 9; then
        echo "$2: waiting for another run holding $CACHE/.lock" >&2
        flock 9
    fi
    rm -rf "$CACHE"/tmp.*
    trap 'rm -rf "$CACHE"/tmp.*' EXIT
}
error() { echo "ERROR: $*"; exit 2; }
# shellcheck disable=SC2034  # the callers report their total time since T0
T0=$EPOCHREALTIME
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
# t LABEL CMD...: run CMD, print `TIME <s> s: LABEL` on stderr, return CMD's status
t() {
    local label=$1 s=$EPOCHREALTIME rc=0
    shift
    "$@" || rc=$?
    echo "TIME $(since "$s") s: $label" >&2
    return "$rc"
}
# logged NAME CMD...: run CMD with its output in $LOGS/NAME.log
logged() {
    local name=$1
    shift
    "$@" >"$LOGS/$name.log" 2>&1
}
tail_log() { echo "---- last lines of $LOGS/$1.log ----"; tail -n "${2:-15}" "$LOGS/$1.log"; echo "----"; }
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}
sha() { sha256sum | cut -c1-16; }
safe() { printf '%s' "${1//[^A-Za-z0-9.+-]/_}"; }
tmpdir() { mktemp -d "$CACHE/tmp.XXXXXX"; }   # all removed on exit (runs are serialized by a lock)
candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2; exit }'; }

# unpack PKG VERSION DEST [HOOK]: download a Debian package and unpack it into DEST (once)
unpack() {
    local pkg=$1 ver=$2 dest=$3 hook=${4:-} tmp
    [ -d "$dest" ] && return 0
    tmp=$(tmpdir)
    (cd "$tmp" && apt-get -q -o APT::Sandbox::User=root download "$pkg=$ver") >"$LOGS/download-${pkg%%:*}.log" 2>&1 ||
        { tail_log "download-${pkg%%:*}" 5; skip "cannot download $pkg=$ver from the Debian archive$APT_OFFLINE"; }
    dpkg-deb -x "$tmp"/*.deb "$tmp/x" || error "cannot unpack $pkg=$ver"
    [ -z "$hook" ] || "$hook" "$tmp/x" || error "cannot unpack $pkg=$ver"
    mkdir -p "$(dirname "$dest")"
    mv "$tmp/x" "$dest" || error "cannot move $pkg into $dest"
    rm -rf "$tmp"
}
# untar_linux DIR: the hook for LINUX_SOURCE: its tarball, unpacked in place of DIR
untar_linux() { tar xJf "$1/usr/src/$LINUX_SOURCE.tar.xz" -C "$1" && mv "$1/$LINUX_SOURCE" "$1.tree" && rm -rf "$1" && mv "$1.tree" "$1"; }

# lab_apt_sources: bookworm-backports (QEMU 10.0) and trixie-backports (linux-source-7.3,
# rust-src), the latter pinned low, and arm64 as a foreign architecture (busybox-static:arm64);
# the same file as ../shared/lab/setup.sh writes
lab_apt_sources() {
    if [ ! -f /etc/apt/sources.list.d/viommu-lab.sources ]; then
        local mirror
        mirror=$(cat /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null |
            grep -E '^(URIs:|deb )' | grep -oE '(https?|ftp)://[^ ]+' | grep -v security | head -n1 || true)
        as_root tee /etc/apt/sources.list.d/viommu-lab.sources >/dev/null <<EOF
Types: deb
URIs: ${mirror:-http://deb.debian.org/debian}
Suites: bookworm-backports trixie-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    [ -f /etc/apt/preferences.d/viommu-lab ] ||
        printf 'Package: *\nPin: release n=trixie-backports\nPin-Priority: 50\n' | as_root tee /etc/apt/preferences.d/viommu-lab >/dev/null
    dpkg --print-foreign-architectures | grep -qx arm64 || as_root dpkg --add-architecture arm64
}

# check_config FRAGMENT CONFIG NAME: every CONFIG_ line of FRAGMENT (called NAME in messages)
# holds in CONFIG; allnoconfig, like olddefconfig, silently drops an option whose dependencies
# are not met
check_config() {
    local line sym val bad=()
    while IFS= read -r line; do
        [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]] || continue
        sym=${BASH_REMATCH[1]} val=${BASH_REMATCH[2]}
        if [ "$val" = n ]; then
            ! grep -q "^$sym=" "$2" || bad+=("$sym=n")
        else
            grep -qxF "$sym=$val" "$2" || bad+=("$sym=$val")
        fi
    done <"$1"
    [ ${#bad[@]} -eq 0 ] || error "kernel build failed: not in the .config after allnoconfig with $3: ${bad[*]}"
}

# guest_kernel FRAGMENT NAME TREE_FN: the arm64 guest kernel of allnoconfig + FRAGMENT (NAME in
# messages), built from the tree TREE_FN VAR unpacks (LINUX_SOURCE at LINUX_VERSION) and cached
# in $CACHE/kernel/<sha256 of the fragment and the source version>; sets KERNEL_KEY, KERNEL_DIR
# and IMAGE. The same kernel in the kernel lab's cache ($LAB_CACHE, when the caller has one) is
# used as it is (read only), so the labs share one build. Uses note, which the caller defines.
guest_kernel() {
    local name=$2 tree_fn=$3 src build
    FRAGMENT=$(tmpdir)/kernel.config   # one snapshot of the fragment for both the key and the build
    cp "$1" "$FRAGMENT"
    KERNEL_KEY=$({ cat "$FRAGMENT"; echo "$LINUX_SOURCE $LINUX_VERSION"; } | sha)
    KERNEL_DIR=$CACHE/kernel/$KERNEL_KEY
    if [ ! -f "$KERNEL_DIR/Image" ] && [ -n "${LAB_CACHE:-}" ] && [ -f "$LAB_CACHE/kernel/$KERNEL_KEY/Image" ]; then
        KERNEL_DIR=$LAB_CACHE/kernel/$KERNEL_KEY
    fi
    IMAGE=$KERNEL_DIR/Image
    if [ -f "$IMAGE" ]; then
        note "kernel cached: $IMAGE"
        check_config "$FRAGMENT" "$KERNEL_DIR/.config" "$name"
        return
    fi
    "$tree_fn" src
    build=$KERNEL_DIR.build
    rm -rf "$build" "$KERNEL_DIR.tmp"
    local km=(make -C "$src" O="$build" ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-)
    t "kernel allnoconfig + $name" logged kernel-config "${km[@]}" KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig ||
        { tail_log kernel-config; error "kernel build failed: allnoconfig with $name"; }
    check_config "$FRAGMENT" "$build/.config" "$name"
    t "kernel build (make -j$(($(nproc) + 1)) Image)" logged kernel-build "${km[@]}" -j"$(($(nproc) + 1))" Image ||
        { tail_log kernel-build 25; error "kernel build failed ($LINUX_SOURCE $LINUX_VERSION; log $LOGS/kernel-build.log)"; }
    mkdir -p "$KERNEL_DIR.tmp"
    cp "$build/arch/arm64/boot/Image" "$build/.config" "$KERNEL_DIR.tmp/"
    cp "$FRAGMENT" "$KERNEL_DIR.tmp/kernel.config"
    echo "$LINUX_SOURCE $LINUX_VERSION" >"$KERNEL_DIR.tmp/version"
    rm -rf "$KERNEL_DIR"
    mv "$KERNEL_DIR.tmp" "$KERNEL_DIR"
    rm -rf "$build"
    note "kernel built: $IMAGE"
}
