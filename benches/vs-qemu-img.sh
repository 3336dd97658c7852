#!/usr/bin/env bash
# Time `diskconv convert` against `qemu-img convert` on the same inputs, in one run, and
# print the table the README's speed section is made from.
#
# Every timed run writes a durable output: the old output is removed (untimed), then
# `CMD && sync` is timed, so each tool pays for its own writeback and never for the
# other's. The tools alternate (qemu-img first in odd rounds, diskconv first in even ones)
# after one uncounted warm-up run each. Per tool the table gives the median wall time of
# ROUNDS runs (not the best) with its min-max, the median CPU time (user+sys), the peak
# RSS, and the size of the output on disk; ratios are diskconv / qemu-img (below 1.00:
# diskconv is faster or smaller). A `cp --sparse=always SRC DST && sync` row of the source
# raw image is the I/O reference: no uncompressed pair should be slower than it.
#
# usage: benches/vs-qemu-img.sh [--shared] [SIZE_BYTES] [PAIRS...]
#   --shared    run two busy loops (one per core of a 2-core machine) beside both tools,
#               for the whole run: the "cores shared with another job" figures
#   SIZE_BYTES  workload size (default 2 GiB: the standard workload of
#               benches/gen-workload.py, deterministic for a given size)
#   PAIRS       names from PAIRS_ALL below (default: the DEFAULT_PAIRS)
# env: ROUNDS (default 3), BENCH_WORK (scratch folder, default bench-work/),
#      ZSTD_C=0 to skip building and timing the `zstd-c` feature's binary on zstd pairs,
#      KEEP_WORK=1 to keep the workload and inputs (default: deleted at the end)
# needs: qemu-img (apt-get install qemu-utils), GNU time (apt-get install time), python3
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=""
if [ "${1:-}" = --shared ]; then SHARED=1; shift; fi
SIZE=${1:-$((2 << 30))}
shift || true
WORK=${BENCH_WORK:-bench-work}
ROUNDS=${ROUNDS:-3}
ZSTD_C=${ZSTD_C:-1}
for tool in qemu-img python3 /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install qemu-utils time python3" >&2; exit 1; }
done
mkdir -p "$WORK"
DC_C=""
if [ "$ZSTD_C" = 1 ]; then
  # The libzstd-backed build, kept beside the default (pure Rust) one.
  cargo build --release --quiet --features zstd-c
  cp target/release/diskconv "$WORK/diskconv-zstd-c"
  DC_C="$WORK/diskconv-zstd-c"
fi
cargo build --release --quiet
DC=target/release/diskconv
SRC="$WORK/workload-$SIZE.raw"
[ -f "$SRC" ] || python3 benches/gen-workload.py "$SRC" "$SIZE"

BUSY=()
cleanup() {
  for p in "${BUSY[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ "${KEEP_WORK:-0}" != 1 ]; then rm -f "$WORK"/workload-* "$WORK"/in-* "$WORK"/out-*; fi
}
trap cleanup EXIT

# Inputs in other formats, made by qemu-img so both tools read the same file.
prep() { # name fmt opts...
  local out="$WORK/in-$1-$SIZE"; shift
  local fmt=$1; shift
  [ -f "$out" ] || qemu-img convert -f raw -O "$fmt" "$@" "$SRC" "$out"
  echo "$out"
}

# name | input fmt | input maker args | output fmt | convert flags
PAIRS_ALL=(
  "raw->qcow2|raw||qcow2|"
  "qcow2->raw|qcow2||raw|"
  "raw->qcow2-c|raw||qcow2|-c"
  "qcow2c->raw|qcow2|-c|raw|"
  "raw->vmdk-stream|raw||vmdk|-o subformat=streamOptimized"
  "vmdkstream->raw|vmdk|-o subformat=streamOptimized|raw|"
  "raw->qcow2-zstd|raw||qcow2|-c -o compression_type=zstd"
  "qcow2zstd->raw|qcow2|-c -o compression_type=zstd|raw|"
  "raw->vpc|raw||vpc|"
  "raw->vpc-fixed|raw||vpc|-o subformat=fixed"
  "vpc->raw|vpc||raw|"
  "raw->vmdk|raw||vmdk|"
  "vmdk->raw|vmdk||raw|"
  "raw->vdi|raw||vdi|"
  "vdi->raw|vdi||raw|"
)
# The pairs of issue 19 (compressed both ways, zstd both ways, the uncompressed qcow2 pair).
DEFAULT_PAIRS=(raw-\>qcow2-c raw-\>vmdk-stream qcow2c-\>raw vmdkstream-\>raw
  raw-\>qcow2-zstd qcow2zstd-\>raw raw-\>qcow2 qcow2-\>raw)
want=("$@")
[ ${#want[@]} -gt 0 ] || want=("${DEFAULT_PAIRS[@]}")

# One durable run: prints "wall_seconds cpu_seconds maxrss_kib", or "FAIL".
# usage: measure OUT CMD...
measure() {
  local out=$1; shift
  local t; t=$(mktemp)
  rm -f "$out"
  # This machine's kernel reclaims idle page cache within seconds: re-read the input so
  # every run starts from the same warm cache.
  cat "$in" >/dev/null
  if /usr/bin/time -f "%e %U %S %M" -o "$t" sh -c '"$@" && sync' sh "$@" >/dev/null 2>"$t.err"; then
    read -r e u s m <"$t"
    python3 -c "print($e, round($u + $s, 2), $m)"
  else
    echo FAIL; sed 's/^/    /' "$t.err" | head -3 >&2
  fi
  rm -f "$t" "$t.err"
}

# "median min max" of the numbers given as arguments.
stats() { python3 -c 'import statistics, sys; v = list(map(float, sys.argv[1:])); print(f"{statistics.median(v):.2f} {min(v):.2f} {max(v):.2f}")' "$@"; }
median() { python3 -c 'import statistics, sys; print(f"{statistics.median(map(float, sys.argv[1:])):.2f}")' "$@"; }
ratio() { python3 -c "print(f'{$1 / max($2, 0.01):.2f}')"; }
# Bytes the file takes on disk, in MiB (holes excluded).
disk_mib() { python3 -c "import os, sys; print(f'{os.stat(sys.argv[1]).st_blocks * 512 / 1048576:.1f}')" "$1"; }

if [ -n "$SHARED" ]; then
  for _ in 1 2; do
    sh -c 'while :; do :; done' &
    BUSY+=($!)
  done
fi

echo "# $(date -u +%F) $(uname -m), $(nproc) cores, $(qemu-img --version | head -1), workload $((SIZE >> 20)) MiB," \
  "ROUNDS=$ROUNDS, durable outputs${SHARED:+, two busy loops running (shared cores)}"
printf "%-26s %-19s %-19s %5s %7s %7s %5s %8s %8s %5s %6s %6s\n" pair "diskconv s" "qemu-img s" ratio \
  "dc cpu" "qm cpu" ratio "dc MiB" "qm MiB" size "dc RSS" "qm RSS"

# Reference row: the source raw image copied sparse.
in=$SRC
cw=(); cm=0
o="$WORK/out-cp"
measure "$o" cp --sparse=always "$SRC" "$o" >/dev/null
for _ in $(seq "$ROUNDS"); do
  r=$(measure "$o" cp --sparse=always "$SRC" "$o")
  [ "$r" = FAIL ] && { echo "cp failed"; exit 1; }
  read -r w c m <<<"$r"; cw+=("$w"); cm=$((m > cm ? m : cm))
done
read -r cmed cmin cmax <<<"$(stats "${cw[@]}")"
printf "%-26s %-19s %-19s %5s %7s %7s %5s %8s %8s %5s %6s %6s\n" "cp --sparse=always" \
  "$cmed ($cmin-$cmax)" - - - - - "$(disk_mib "$o")" - - $((cm / 1024)) -
rm -f "$o"

# One table row: diskconv binary $1 (label $2) against qemu-img on pair spec $3.
bench_pair() {
  local bin=$1 label=$2 name ifmt imk ofmt flags
  IFS='|' read -r name ifmt imk ofmt flags <<<"$3"
  if [ "$ifmt" = raw ]; then in=$SRC; else
    # shellcheck disable=SC2086
    in=$(prep "$name" "$ifmt" $imk)
  fi
  local o1="$WORK/out-dc" o2="$WORK/out-qemu"
  # shellcheck disable=SC2206
  local qemu_cmd=(qemu-img convert -f "$ifmt" -O "$ofmt" $flags "$in" "$o2")
  # shellcheck disable=SC2206
  local dc_cmd=("$bin" convert -f "$ifmt" -O "$ofmt" $flags "$in" "$o1")
  # Uncounted warm-up: the first write of a pair pays for the kernel reclaiming page
  # cache, whichever tool goes first.
  measure "$o2" "${qemu_cmd[@]}" >/dev/null
  measure "$o1" "${dc_cmd[@]}" >/dev/null
  dw=(); dcpu=(); dm=0; qw=(); qcpu=(); qm=0; failed=""
  run() { # dc|qemu
    local r
    if [ "$1" = dc ]; then r=$(measure "$o1" "${dc_cmd[@]}"); else r=$(measure "$o2" "${qemu_cmd[@]}"); fi
    [ "$r" = FAIL ] && { failed="$1"; return 1; }
    read -r w c m <<<"$r"
    if [ "$1" = dc ]; then dw+=("$w"); dcpu+=("$c"); dm=$((m > dm ? m : dm))
    else qw+=("$w"); qcpu+=("$c"); qm=$((m > qm ? m : qm)); fi
  }
  for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) -eq 1 ]; then run qemu && run dc || break; else run dc && run qemu || break; fi
  done
  if [ -n "$failed" ]; then
    printf "%-26s %s failed\n" "$name$label" "$failed"
  else
    read -r ds dmin dmax <<<"$(stats "${dw[@]}")"
    read -r ts tmin tmax <<<"$(stats "${qw[@]}")"
    local dc tc dsz tsz
    dc=$(median "${dcpu[@]}"); tc=$(median "${qcpu[@]}")
    dsz=$(disk_mib "$o1"); tsz=$(disk_mib "$o2")
    printf "%-26s %-19s %-19s %5s %7s %7s %5s %8s %8s %5s %6s %6s\n" "$name$label" \
      "$ds ($dmin-$dmax)" "$ts ($tmin-$tmax)" "$(ratio "$ds" "$ts")" \
      "$dc" "$tc" "$(ratio "$dc" "$tc")" "$dsz" "$tsz" "$(ratio "$dsz" "$tsz")" \
      $((dm / 1024)) $((qm / 1024))
    # Same guest content and a clean image, or the figure means nothing.
    qemu-img compare -q -f "$ofmt" -F "$ofmt" "$o1" "$o2" || echo "    !! outputs differ for $name$label"
    if [ "$ofmt" != raw ]; then
      qemu-img check -q -f "$ofmt" "$o1" >/dev/null 2>&1 || echo "    !! qemu-img check fails on diskconv's $name$label"
    fi
  fi
  rm -f "$o1" "$o2"
}

for p in "${PAIRS_ALL[@]}"; do
  name=${p%%|*}
  [[ " ${want[*]} " == *" $name "* ]] || continue
  bench_pair "$DC" "" "$p"
  if [ -n "$DC_C" ] && [[ $name == *zstd* ]]; then bench_pair "$DC_C" " [zstd-c]" "$p"; fi
done
