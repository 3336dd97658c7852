#!/usr/bin/env bash
# run-tests.sh [PYTEST ARGS] -- the Glance plugin's tests: its unit tests (tests/test_run.py,
# the real diskconv binary on images qemu-img makes) and the two-node Glance tests
# (tests/test_import.py: PostgreSQL from Debian's packages, two glance-api processes, the
# file store, and the S3 and RBD stores when scripts/test's SeaweedFS and Ceph run).
#
# Called by scripts/test (servers and their env already up). Needs the Glance venv that
# tests/servers/up.sh builds (target/test-servers/glance-venv); adds to it, once, pytest,
# psycopg2-binary (PostgreSQL), this plugin (editable) and Debian's rados/rbd modules.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VENV=${GLANCE_VENV:-$ROOT/target/test-servers/glance-venv}
if [ ! -x "$VENV/bin/uwsgi" ]; then
  echo "run-tests.sh: no Glance venv at $VENV (tests/servers/up.sh builds it)" >&2
  [ -n "${CI:-}" ] && exit 1
  exit 0
fi
PY=$VENV/bin/python
"$PY" -c 'import pytest, psycopg2' 2>/dev/null ||
  "$PY" -m pip install -q --disable-pip-version-check 'pytest==8.3.5' 'psycopg2-binary==2.9.10'
"$PY" -c 'import diskconv_glance.plugin' 2>/dev/null ||
  "$PY" -m pip install -q --disable-pip-version-check --no-deps -e "$HERE"
# Ceph's Python bindings are Debian's (built for its python3.11, the venv's ABI too).
SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for m in rados rbd; do
  so=$(ls /usr/lib/python3/dist-packages/$m.cpython-3*-x86_64-linux-gnu.so 2>/dev/null | head -1 || true)
  [ -n "$so" ] && [ ! -e "$SP/$(basename "$so")" ] && ln -s "$so" "$SP/"
done
command -v setpriv >/dev/null && command -v prlimit >/dev/null ||
  { echo "run-tests.sh: setpriv and prlimit (util-linux) are needed" >&2; exit 1; }
export DISKCONV_BIN=${DISKCONV_BIN:-$ROOT/target/release/diskconv}
[ -x "$DISKCONV_BIN" ] || (cd "$ROOT" && cargo build --release --quiet)
# The wheel scripts/test-wheel built, when there is one, installed as the README tells a
# user: into Glance's venv, the plugin configured with `binary = diskconv`.
wheel=$(ls "$ROOT"/target/test-wheel/wheels/diskconv-*.whl 2>/dev/null | head -1 || true)
if [ -n "$wheel" ]; then
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$wheel"
  export GLANCE_PLUGIN_BINARY=diskconv
  echo "run-tests.sh: the plugin runs $VENV/bin/diskconv from $(basename "$wheel")" >&2
fi
export GLANCE_VENV=$VENV
cd "$HERE/tests"
exec "$PY" -m pytest -q -rs -p no:cacheprovider "$@"
