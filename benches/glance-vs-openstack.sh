#!/usr/bin/env bash
# Convert+register into Glance on loopback: diskconv in one pass (`convert -O raw SRC
# glance://NAME`) against `qemu-img convert` to a file, then `openstack image create --file`
# (python-openstackclient, which reads the file again for its checksums).
# Prints wall time, peak RSS and local disk used by each, and the ratios.
#
# usage: benches/glance-vs-openstack.sh [SIZE_BYTES]   (default 256 MiB of the standard workload)
# Needs: a Glance (GLANCE_URL, or DISKCONV_TEST_GLANCE_URL as tests/servers/up.sh exports),
# and optionally Keystone (OS_* of DISKCONV_TEST_KEYSTONE_ENV); qemu-img; GNU time;
# python-openstackclient in OSC_VENV (default target/test-servers/osc-venv; installed from
# PyPI when missing). DISKCONV: the binary (default target/release/diskconv, else debug).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-$((256 << 20))}
U=${GLANCE_URL:-${DISKCONV_TEST_GLANCE_URL:?set GLANCE_URL (a running Glance)}}
OSC_VENV=${OSC_VENV:-target/test-servers/osc-venv}
BIN=${DISKCONV:-target/release/diskconv}
[ -x "$BIN" ] || BIN=target/debug/diskconv
if [ ! -x "$OSC_VENV/bin/openstack" ]; then
  "${PYTHON:-python3.11}" -m venv "$OSC_VENV"
  "$OSC_VENV/bin/pip" install -q -c tests/servers/glance/constraints.txt python-openstackclient
fi
W=$(mktemp -d "${TMPDIR:-/tmp}/glance-bench.XXXXXX"); trap 'rm -rf "$W"' EXIT
python3 benches/gen-workload.py "$W/work.raw" "$SIZE"
qemu-img convert -q -f raw -O vmdk "$W/work.raw" "$W/src.vmdk"; rm "$W/work.raw"
if [ -n "${DISKCONV_TEST_KEYSTONE_ENV:-}" ]; then
  set -a; . "$DISKCONV_TEST_KEYSTONE_ENV"; set +a; AUTH=keystone
  OSC=("$OSC_VENV/bin/openstack")
else
  export OS_AUTH_TOKEN=bench OS_IMAGE_URL=$U; AUTH=token
  OSC=("$OSC_VENV/bin/openstack" --os-auth-type admin_token --os-endpoint "$U" --os-token bench)
fi
T=(/usr/bin/time -f '%e %M')
measure() { "${T[@]}" -o "$W/t" "$@" > /dev/null; cat "$W/t"; }   # -> "seconds maxrss_kib"

read -r d_s d_kb < <(measure "$BIN" convert -O qcow2 "$W/src.vmdk" glance://bench-diskconv --glance-method upload)
read -r q_s q_kb < <(measure qemu-img convert -f vmdk -O qcow2 "$W/src.vmdk" "$W/tmp.qcow2")
tmp_kb=$(du -k "$W/tmp.qcow2" | cut -f1)
read -r o_s o_kb < <(measure "${OSC[@]}" image create --disk-format qcow2 --container-format bare --file "$W/tmp.qcow2" bench-openstack)
for n in bench-diskconv bench-openstack; do
  for id in $(curl -s --noproxy '*' "$U/v2/images?name=$n" -H "X-Auth-Token: bench" | python3 -c 'import json,sys; print(" ".join(i["id"] for i in json.load(sys.stdin)["images"]))'); do
    curl -s --noproxy '*' -X DELETE -H "X-Auth-Token: bench" "$U/v2/images/$id"; done; done
awk -v size="$SIZE" -v auth="$AUTH" -v ds="$d_s" -v dk="$d_kb" -v qs="$q_s" -v qk="$q_kb" -v os="$o_s" -v ok="$o_kb" -v tk="$tmp_kb" 'BEGIN {
  printf "workload %d MiB (vmdk -> qcow2), auth %s\n", size / 1048576, auth
  printf "%-34s %8s %10s %12s\n", "", "wall s", "peak MiB", "disk MiB"
  printf "%-34s %8.2f %10.1f %12.1f\n", "diskconv -> glance:// (one pass)", ds, dk / 1024, 0
  printf "%-34s %8.2f %10.1f %12.1f\n", "qemu-img convert", qs, qk / 1024, tk / 1024
  printf "%-34s %8.2f %10.1f %12s\n", "openstack image create --file", os, ok / 1024, "(same file)"
  printf "%-34s %8.2f %10.1f %12.1f\n", "qemu-img + openstack", qs + os, (qk > ok ? qk : ok) / 1024, tk / 1024
  printf "ratio wall (two steps / diskconv): %.2f; peak RSS: %.2f\n", (qs + os) / ds, (qk > ok ? qk : ok) / dk
}'
