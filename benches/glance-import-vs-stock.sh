#!/usr/bin/env bash
# Glance image import: the stock `image_conversion` plugin (Glance's format inspector, then
# qemu-img info and convert) against `diskconv_conversion` (integrations/glance), on one
# two-node Glance (node A stock, node B ours; one PostgreSQL, one file store), the same
# images. Prints the median import wall time per source format of the standard workload
# and the ratio ours / stock, then what each plugin does with the hostile set.
#
# usage: benches/glance-import-vs-stock.sh [SIZE_BYTES]   (default 1 GiB)
# env: BENCH_ROUNDS (default 3). Needs what integrations/glance/run-tests.sh needs (the
# Glance venv tests/servers/up.sh builds, PostgreSQL, qemu-img).
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_SIZE=${1:-$((1 << 30))} GLANCE_PAIR_PLUGINS=image_conversion,diskconv_conversion
cargo build --release --quiet
exec integrations/glance/run-tests.sh bench_import.py -s
