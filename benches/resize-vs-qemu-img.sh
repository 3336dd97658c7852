#!/usr/bin/env bash
# Resize cost, diskconv against qemu-img on the same images in one run: a 1 TiB sparse
# qcow2 (64 KiB and 4 KiB clusters) and vdi grown to 2 TiB, and the qcow2 shrunk back.
# A resize should cost metadata, never data: the script reports wall time (median of
# ROUNDS alternating runs, each on a fresh copy, timed to a durable result: CMD && sync)
# and the bytes each tool writes (summed from strace's pwrite64/write return values).
# qemu-img cannot resize vdi, so vdi is diskconv alone.
#
# Usage: benches/resize-vs-qemu-img.sh [ROUNDS]   (needs qemu-img, strace, GNU time)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
cargo build --release -q
D=$PWD/target/release/diskconv
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT

# 48 MiB of data spread over the first TiB.
head -c 48M /dev/urandom > "$W/data"
mk() { # fmt opts out
  qemu-img create -q -f "$1" ${2:+-o "$2"} "$3" 1T
  for i in 0 1 2 3 4 5; do
    qemu-io -f "$1" -c "write -P $((i + 1)) $((i * 170))G 8M" "$3" >/dev/null
  done
}
mk qcow2 cluster_size=65536 "$W/q64.qcow2"
mk qcow2 cluster_size=4096 "$W/q4.qcow2"
mk vdi "" "$W/v.vdi"

bytes_written() { # cmd...: run under strace, print bytes written
  strace -f -qq -o "$W/trace" -e trace=pwrite64,write "$@" >/dev/null 2>&1 || true
  awk -F'= ' '/= [0-9]+$/ {s += $NF} END {print s + 0}' "$W/trace"
}
time_one() { # cmd...: seconds to a durable result
  sync
  /usr/bin/time -f %e -o "$W/t" "$@" >/dev/null 2>&1 && sync
  cat "$W/t"
}
median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

row() { # label img fmt size flags...
  local label=$1 img=$2 fmt=$3 size=$4; shift 4
  local ours=() theirs=()
  for _ in $(seq "$ROUNDS"); do
    cp --sparse=always "$img" "$W/a"; ours+=("$(time_one "$D" resize -f "$fmt" "$@" "$W/a" "$size")")
    if [ "$fmt" != vdi ]; then
      cp --sparse=always "$img" "$W/b"; theirs+=("$(time_one qemu-img resize -q -f "$fmt" "$@" "$W/b" "$size")")
    fi
  done
  cp --sparse=always "$img" "$W/a"; local ob; ob=$(bytes_written "$D" resize -f "$fmt" "$@" "$W/a" "$size")
  local om; om=$(printf '%s\n' "${ours[@]}" | median)
  if [ "$fmt" = vdi ]; then
    printf '%-34s diskconv %7ss %12s B   qemu-img (cannot resize vdi)\n' "$label" "$om" "$ob"
    return
  fi
  cp --sparse=always "$img" "$W/b"; local qb; qb=$(bytes_written qemu-img resize -q -f "$fmt" "$@" "$W/b" "$size")
  local qm; qm=$(printf '%s\n' "${theirs[@]}" | median)
  printf '%-34s diskconv %7ss %12s B   qemu-img %7ss %12s B   time ratio %s\n' \
    "$label" "$om" "$ob" "$qm" "$qb" "$(awk -v a="$om" -v b="$qm" 'BEGIN {printf "%.2f", (b > 0 ? a / b : 0)}')"
}

row "qcow2 64k 1T -> 2T" "$W/q64.qcow2" qcow2 2T
row "qcow2 4k 1T -> 2T (L1 moves)" "$W/q4.qcow2" qcow2 2T
qemu-img resize -q "$W/q64.qcow2" 2T
row "qcow2 64k 2T -> 1T --shrink" "$W/q64.qcow2" qcow2 1T --shrink
row "vdi 1T -> 2T" "$W/v.vdi" vdi 2T
