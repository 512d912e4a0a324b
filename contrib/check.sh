#!/usr/bin/env bash
# Checks what contrib/ ships: every libvirt domain XML against libvirt 12.x's schemas with
# virt-xml-validate (libvirt-clients and libvirt-common from trixie-backports, unpacked, no daemon
# installed), the hook script with `sh -n`, the systemd units' settings that the daemon's
# behaviour depends on (Type=notify, NotifyAccess=main, Restart=on-failure, the system calls its
# own sandbox needs, the sandboxing directives), every unit with `systemd-analyze verify`, and the
# units under a real systemd (backend/tests/systemd.rs: socket activation, READY=1 and STATUS=,
# kill -9 and the daemon back on the same socket). Without a running manager, and as root with
# unshare(1), it starts a private user manager for that, in a mount namespace of its own.
# A deliberately broken copy of each must fail, so a check that accepts anything is caught.
# usage: contrib/check.sh [BACKEND_BINARY]   (default target/debug/viommu-backend)
# Ends with `N passed, M failed`; a missing prerequisite prints `SKIPPED:` and exits 77 (at once
# for libvirt; after the other checks for the systemd tools).
set -euo pipefail
cd "$(dirname "$0")/.."
BACKEND=$(readlink -f "${1:-target/debug/viommu-backend}")
CACHE=${VIOMMU_CONTRIB_CACHE:-/var/cache/viommu-contrib}
LIBVIRT_VERSION=${VIOMMU_LIBVIRT_VERSION:-12.9.0-1~bpo13+1}
passed=0
failed=0
ok() { echo "ok   $*"; passed=$((passed + 1)); }
fail() { echo "FAIL $*"; failed=$((failed + 1)); }
skip() { echo "SKIPPED: $*"; exit 77; }
# A part that cannot run: said at once and again at the end, which then exits 77.
skipped=()
skip_part() {
    echo "SKIPPED: $*"
    skipped+=("$*")
}

# ---- libvirt's validator and schemas ---------------------------------------------------------
root=$CACHE/libvirt-$LIBVIRT_VERSION
if [ ! -x "$root/usr/bin/virt-xml-validate" ]; then
    command -v apt-get >/dev/null || skip "no apt-get to fetch libvirt $LIBVIRT_VERSION"
    tmp=$(mktemp -d)
    if ! (cd "$tmp" && apt-get download -q "libvirt-clients=$LIBVIRT_VERSION" \
        "libvirt-common=$LIBVIRT_VERSION" >/dev/null 2>&1); then
        rm -rf "$tmp"
        skip "libvirt-clients and libvirt-common $LIBVIRT_VERSION cannot be downloaded (is trixie-backports among the apt sources? tests/lab/run.sh adds it)"
    fi
    mkdir -p "$root.part"
    for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$root.part"; done
    rm -rf "$tmp" "$root"
    mv "$root.part" "$root"
fi
command -v xmllint >/dev/null || apt-get install -y -q libxml2-utils >/dev/null 2>&1 ||
    skip "xmllint (libxml2-utils) cannot be installed"
validator=$(mktemp)
manager_pid=
manager_runtime=
cleanup() {
    rm -f "$validator"
    rm -rf "${units:-}"
    if [ -n "$manager_pid" ]; then
        kill "$manager_pid" 2>/dev/null || true
        wait "$manager_pid" 2>/dev/null || true
    fi
    if [ -n "$manager_runtime" ]; then rm -rf "$manager_runtime"; fi
}
trap cleanup EXIT
sed "s#/usr/share/libvirt/schemas#$root/usr/share/libvirt/schemas#" \
    "$root/usr/bin/virt-xml-validate" >"$validator"

for xml in contrib/libvirt/*.xml; do
    if out=$(bash "$validator" "$xml" domain 2>&1); then
        ok "libvirt $LIBVIRT_VERSION schema: $xml"
    else
        fail "libvirt $LIBVIRT_VERSION schema: $xml: $out"
    fi
    broken=$(mktemp --suffix=.xml)
    sed 's/<iommu model=.smmuv3.>/<iommu model="smmuv3" bogus="1">/' "$xml" >"$broken"
    if bash "$validator" "$broken" domain >/dev/null 2>&1; then
        fail "the validator accepted a broken copy of $xml"
    else
        ok "the validator refuses a broken copy of $xml"
    fi
    rm -f "$broken"
done

if sh -n contrib/libvirt/hooks/qemu; then ok "hook script syntax"; else fail "hook script syntax"; fi
# The hook, with a systemctl that records what it is asked: prepare starts the socket of the
# vSMMU the domain's chardev names, release stops it, other operations and domains do nothing.
fakebin=$(mktemp -d)
printf '#!/bin/sh\necho "systemctl $*" >> "%s/calls"\n' "$fakebin" >"$fakebin/systemctl"
chmod +x "$fakebin/systemctl"
hook() { PATH="$fakebin:$PATH" sh contrib/libvirt/hooks/qemu "$@" <contrib/libvirt/emulated.xml; }
hook vm1 prepare begin -
hook vm1 started begin -
hook vm1 release end -
hook other prepare begin -
expected="systemctl start viommu-backend@vm1-smmu0.socket
systemctl stop viommu-backend@vm1-smmu0.service viommu-backend@vm1-smmu0.socket"
if [ "$(cat "$fakebin/calls" 2>/dev/null)" = "$expected" ]; then
    ok "hook starts and stops the domain's backend"
else
    fail "hook: systemctl calls were: $(cat "$fakebin/calls" 2>/dev/null)"
fi
rm -rf "$fakebin"

# ---- systemd units: the settings the daemon depends on -----------------------------------------
# Every value of KEY in a unit file, one a line, in order.
unit_values() { sed -n "s/^$2=//p" "$1"; }
# The problems of a service unit, one a line (none: it is fit).
service_problems() {
    local unit=$1 value ms
    expect() {
        value=$(unit_values "$unit" "$1" | tail -n 1)
        [ "$value" = "$2" ] || echo "$1=$value, not $2${3:+ ($3)}"
    }
    expect Type notify "the daemon sends READY=1 once it accepts frontends"
    expect NotifyAccess main "only the daemon's own process notifies"
    expect Restart on-failure "a killed daemon comes back by itself"
    expect Requires viommu-backend@%i.socket
    expect After viommu-backend@%i.socket
    value=$(unit_values "$unit" ExecStart)
    [[ $value == *" --listen-fd 3" ]] || echo "ExecStart=$value does not take the socket unit's fd 3"
    value=$(unit_values "$unit" RestartSec | tail -n 1)
    # systemd's time spans: 100ms, 1s, or a bare number of seconds (unset: 100 ms).
    case "$value" in
    '') ms=100 ;;
    *ms) ms=${value%ms} ;;
    *s) ms=${value%s}000 ;;
    *) ms=${value}000 ;;
    esac
    [[ $ms =~ ^[0-9]+$ ]] && [ "$ms" -le 1000 ] ||
        echo "RestartSec=$value: QEMU's reconnect should find a daemon within a second"
    [ -z "$(unit_values "$unit" WatchdogSec)" ] ||
        echo "WatchdogSec is set, but the daemon sends no WATCHDOG=1"
    for setting in DynamicUser=yes NoNewPrivileges=yes CapabilityBoundingSet= PrivateDevices=yes \
        PrivateNetwork=yes PrivateTmp=yes ProtectSystem=strict ProtectHome=yes \
        RestrictAddressFamilies=AF_UNIX MemoryDenyWriteExecute=yes SystemCallArchitectures=native \
        SystemCallFilter=@system-service; do
        grep -qx "$setting" "$unit" || echo "no $setting (the sandboxing directives stay)"
    done
    # systemd's filter must let the daemon enter its own sandbox: a ~ line removes, a later
    # plain line adds back.
    local deny call line
    deny=$(grep -n '^SystemCallFilter=~' "$unit" | tail -n 1 | cut -d: -f1)
    for call in capset seccomp landlock_create_ruleset landlock_add_rule landlock_restrict_self; do
        line=$(grep -nE "^SystemCallFilter=([^~].* )?$call( |$)" "$unit" | tail -n 1 | cut -d: -f1)
        [ -n "$line" ] && [ "$line" -gt "${deny:-0}" ] ||
            echo "SystemCallFilter does not allow $call, which the daemon's own sandbox needs"
    done
}
socket_problems() {
    local unit=$1
    for setting in Accept=no ListenStream=/run/viommu/%i.sock Service=viommu-backend@%i.service \
        RemoveOnStop=yes; do
        grep -qx "$setting" "$unit" || echo "no $setting"
    done
}
service=contrib/systemd/viommu-backend@.service
socket=contrib/systemd/viommu-backend@.socket
if out=$(service_problems "$service") && [ -z "$out" ]; then
    ok "$service: Type=notify, NotifyAccess=main, Restart=on-failure, sandboxing"
else
    fail "$service: $out"
fi
if out=$(socket_problems "$socket") && [ -z "$out" ]; then
    ok "$socket: one listening socket kept for the service (Accept=no)"
else
    fail "$socket: $out"
fi
broken=$(mktemp)
for edit in 's/^Type=notify$/Type=exec/' 's/^NotifyAccess=main$/NotifyAccess=all/' \
    's/^Restart=on-failure$/Restart=no/' 's/^RestartSec=.*/RestartSec=5/' \
    's/^\(SystemCallFilter=capset\).*/\1/' 's/^PrivateNetwork=yes$//' '$a WatchdogSec=10'; do
    sed "$edit" "$service" >"$broken"
    if [ -n "$(service_problems "$broken")" ]; then
        ok "the unit checks refuse a service edited with '$edit'"
    else
        fail "the unit checks accepted a service edited with '$edit'"
    fi
done
sed 's/^Accept=no$/Accept=yes/' "$socket" >"$broken"
if [ -n "$(socket_problems "$broken")" ]; then
    ok "the unit checks refuse a socket with Accept=yes"
else
    fail "the unit checks accepted a socket with Accept=yes"
fi
rm -f "$broken"

# ---- systemd units: systemd-analyze verify ----------------------------------------------------
if ! command -v systemd-analyze >/dev/null; then
    skip_part "no systemd-analyze: the units were not verified"
elif [ ! -x "$BACKEND" ]; then
    skip_part "no backend binary at $BACKEND (cargo build -p viommu-backend): the units were not verified"
else
    units=$(mktemp -d)
    for unit in contrib/systemd/*; do
        name=$(basename "$unit")
        # Verify an instance, with ExecStart pointing at the binary just built.
        instance=${name/@./@vm1-smmu0.}
        sed "s#/usr/bin/viommu-backend#$BACKEND#" "$unit" >"$units/$instance"
    done
    for unit in "$units"/*; do
        if out=$(systemd-analyze verify --man=no "$unit" 2>&1) && [ -z "$out" ]; then
            ok "systemd-analyze verify $(basename "$unit")"
        else
            fail "systemd-analyze verify $(basename "$unit"): $out"
        fi
    done
    bad=$units/broken@vm1-smmu0.service
    sed 's/^NoNewPrivileges=yes/NoNewPrivileges=maybe/' "$units/viommu-backend@vm1-smmu0.service" >"$bad"
    if out=$(systemd-analyze verify --man=no "$bad" 2>&1) && [ -z "$out" ]; then
        fail "systemd-analyze accepted a broken unit"
    else
        ok "systemd-analyze refuses a broken unit"
    fi
fi

# ---- systemd units under a real systemd ---------------------------------------------------------
# backend/tests/systemd.rs installs renamed copies of the units in a running manager, connects,
# `systemctl kill -s KILL`s the daemon and checks that it comes back on the same socket.
systemd_env=(VIOMMU_REQUIRE_SYSTEMD=1)
manager_answers() { systemctl "$@" show --property=Version --value >/dev/null 2>&1; }
if ! command -v cargo >/dev/null || ! command -v systemctl >/dev/null; then
    skip_part "no cargo or no systemctl: the units did not run under systemd"
    systemd_env=()
elif { [ -d /run/systemd/system ] && [ "$(id -u)" -eq 0 ] && manager_answers; } ||
    manager_answers --user; then
    echo "the units under the running service manager"
elif [ "$(id -u)" -eq 0 ] && command -v unshare >/dev/null && command -v systemd >/dev/null; then
    # A user manager of our own. systemd refuses to run one on a machine not booted with
    # systemd (no /run/systemd/system), so it gets a private /run in a mount namespace of its
    # own; its sockets are in a private XDG_RUNTIME_DIR, which systemctl --user reaches from here.
    manager_runtime=$(mktemp -d)
    unshare --mount --propagation private sh -c \
        'mount -t tmpfs -o mode=0755 tmpfs /run && mkdir -p /run/systemd/system &&
         XDG_RUNTIME_DIR=$1 exec systemd --user' sh "$manager_runtime" \
        >"$manager_runtime.log" 2>&1 &
    manager_pid=$!
    for _ in $(seq 100); do
        XDG_RUNTIME_DIR=$manager_runtime manager_answers --user && break
        sleep 0.1
    done
    echo "the units under a private user manager (pid $manager_pid, XDG_RUNTIME_DIR=$manager_runtime)"
    systemd_env+=(XDG_RUNTIME_DIR="$manager_runtime" VIOMMU_SYSTEMD_SCOPE=user)
else
    skip_part "no service manager answers, and starting a private one needs root, unshare and systemd: the units did not run under systemd"
    systemd_env=()
fi
if [ "${#systemd_env[@]}" -gt 0 ]; then
    if out=$(env "${systemd_env[@]}" cargo test --locked -q -p viommu-backend --test systemd \
        -- --nocapture 2>&1); then
        ok "under systemd: socket activation, READY=1 and STATUS=, kill -9 and back on the same socket"
    else
        fail "under systemd (backend/tests/systemd.rs): $out"
        [ -z "$manager_runtime" ] || cat "$manager_runtime.log" 2>/dev/null || true
    fi
    rm -f "${manager_runtime:+$manager_runtime.log}"
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] || exit 1
if [ "${#skipped[@]}" -gt 0 ]; then
    printf 'SKIPPED: %s\n' "${skipped[@]}"
    exit 77
fi
