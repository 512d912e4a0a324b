#!/usr/bin/env bash
# Checks what contrib/ ships: every libvirt domain XML against libvirt 12.x's schemas with
# virt-xml-validate (libvirt-clients and libvirt-common from trixie-backports, unpacked, no daemon
# installed), the hook script with `sh -n`, and every systemd unit with `systemd-analyze verify`.
# A deliberately broken copy of each must fail, so a check that accepts anything is caught.
# usage: contrib/check.sh [BACKEND_BINARY]   (default target/debug/viommu-backend)
# Ends with `N passed, M failed`; a missing prerequisite prints `SKIPPED:` and exits 77.
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
trap 'rm -f "$validator"; rm -rf "${units:-}"' EXIT
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

# ---- systemd units ----------------------------------------------------------------------------
command -v systemd-analyze >/dev/null || skip "no systemd-analyze"
[ -x "$BACKEND" ] || skip "no backend binary at $BACKEND (cargo build -p viommu-backend)"
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

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
