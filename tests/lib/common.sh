# Shell helpers shared by the kernel lab (tests/lab/run.sh) and the end-to-end guest test
# (tests/e2e/qemu-guest.sh). Sourced, not run: the caller sets CACHE and LOGS before using
# logged, tail_log, tmpdir and unpack, APT_OFFLINE (a note for skip messages, may be empty) before
# unpack, and LINUX_SOURCE (the Debian package name, linux-source-X.Y) before untar_linux.
# shellcheck shell=bash

skip() { echo "SKIPPED: $*"; exit 77; }
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
