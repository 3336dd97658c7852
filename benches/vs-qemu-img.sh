#!/usr/bin/env bash
# Time `diskconv convert` against `qemu-img convert` on the same inputs, in one run.
# Prints wall time, peak RSS and the ratio (diskconv / qemu-img; below 1.00 means we win).
#
# After one uncounted warm-up run each, each tool runs ROUNDS times (default 3), alternating, after `sync` and with its previous
# output removed, so neither pays for the other's page-cache writeback; the best time and
# the highest peak RSS are reported.
#
# usage: benches/vs-qemu-img.sh [SIZE_BYTES] [PAIRS...]
#   SIZE_BYTES  workload size (default 2 GiB, the standard ../shared/tools/gen-workload.py one)
#   PAIRS       subset of the pair names below (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-$((2 << 30))}
shift || true
WORK=${BENCH_WORK:-bench-work}
ROUNDS=${ROUNDS:-3}
mkdir -p "$WORK"
cargo build --release --quiet
DC=target/release/diskconv
GEN=../shared/tools/gen-workload.py
SRC="$WORK/workload-$SIZE.raw"
[ -f "$SRC" ] || python3 "$GEN" "$SRC" "$SIZE"

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
  "raw->vpc|raw||vpc|"
  "raw->vpc-fixed|raw||vpc|-o subformat=fixed"
  "vpc->raw|vpc||raw|"
  "raw->vmdk|raw||vmdk|"
  "raw->vmdk-stream|raw||vmdk|-o subformat=streamOptimized"
  "vmdk->raw|vmdk||raw|"
  "raw->vdi|raw||vdi|"
  "vdi->raw|vdi||raw|"
)
want=("$@")

measure() { # tool args... ; prints "wall_seconds maxrss_kib cpu_seconds"
  local t; t=$(mktemp)
  # This machine's kernel reclaims idle page cache within seconds: re-read the input so
  # every run starts from the same warm cache.
  cat "$in" >/dev/null
  if /usr/bin/time -f "%e %M %U %S" -o "$t" "$@" >/dev/null 2>"$t.err"; then
    read -r e m u s <"$t"
    echo "$e $m $(python3 -c "print(round($u + $s, 2))")"
  else
    echo "FAIL FAIL FAIL"; sed 's/^/    /' "$t.err" | head -3 >&2
  fi
  rm -f "$t" "$t.err"
}

best() { # the smaller of two times (the first may be empty)
  if [ -z "$1" ]; then echo "$2"; else python3 -c "print(min($1, $2))"; fi
}

# Wall time is the figure that counts; CPU time (user+sys) is printed beside it because it
# is far less disturbed by other load on the machine.
printf "%-18s %8s %8s %6s %8s %8s %6s %7s %7s\n" pair "dc s" "qemu s" ratio "dc cpu" "qemu cpu" ratio "dc MiB" "qemu MiB"
for p in "${PAIRS_ALL[@]}"; do
  IFS='|' read -r name ifmt imk ofmt flags <<<"$p"
  if [ ${#want[@]} -gt 0 ] && [[ ! " ${want[*]} " == *" $name "* ]]; then continue; fi
  if [ "$ifmt" = raw ]; then in=$SRC; else
    # shellcheck disable=SC2086
    in=$(prep "$name" "$ifmt" $imk)
  fi
  cat "$in" >/dev/null # same warm page cache for both tools
  o1="$WORK/out-dc"; o2="$WORK/out-qemu"
  ds=""; ts=""; dm=0; tm=0; dc=""; tc=""
  # One uncounted warm-up run of each: the first write of a pair pays for the kernel
  # reclaiming page cache, whichever tool goes first.
  rm -f "$o1" "$o2"; sync
  # shellcheck disable=SC2086
  measure qemu-img convert -f "$ifmt" -O "$ofmt" $flags "$in" "$o2" >/dev/null
  # shellcheck disable=SC2086
  measure "$DC" convert -f "$ifmt" -O "$ofmt" $flags "$in" "$o1" >/dev/null
  run_qemu() {
    rm -f "$o2"; sync
    # shellcheck disable=SC2086
    read -r s m c < <(measure qemu-img convert -f "$ifmt" -O "$ofmt" $flags "$in" "$o2")
    [ "$s" = FAIL ] && { ts=FAIL; return 1; }
    ts=$(best "$ts" "$s"); tm=$((m > tm ? m : tm)); tc=$(best "$tc" "$c")
  }
  run_dc() {
    rm -f "$o1"; sync
    # shellcheck disable=SC2086
    read -r s m c < <(measure "$DC" convert -f "$ifmt" -O "$ofmt" $flags "$in" "$o1")
    [ "$s" = FAIL ] && { ds=FAIL; return 1; }
    ds=$(best "$ds" "$s"); dm=$((m > dm ? m : dm)); dc=$(best "$dc" "$c")
  }
  # The order alternates: whichever tool runs second finds the other's fresh output on
  # disk, and on this machine that alone can slow a run several-fold.
  for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) -eq 1 ]; then run_qemu && run_dc || break; else run_dc && run_qemu || break; fi
  done
  if [ "$ds" = FAIL ] || [ "$ts" = FAIL ]; then
    printf "%-18s %8s %8s %6s\n" "$name" "$ds" "$ts" "-"
  else
    ratio=$(python3 -c "print(f'{$ds/max($ts,0.01):.2f}')")
    cratio=$(python3 -c "print(f'{$dc/max($tc,0.01):.2f}')")
    printf "%-18s %8s %8s %6s %8s %8s %6s %7d %7d\n" "$name" "$ds" "$ts" "$ratio" "$dc" "$tc" "$cratio" $((dm / 1024)) $((tm / 1024))
    # Same guest content, or the figure means nothing.
    qemu-img compare -q -f "$ofmt" -F "$ofmt" "$o1" "$o2" || echo "    !! outputs differ for $name"
  fi
  rm -f "$o1" "$o2"
done
