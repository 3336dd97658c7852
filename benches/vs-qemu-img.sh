#!/usr/bin/env bash
# Time `diskconv convert` against `qemu-img convert` on the same inputs, in one run.
# Prints median wall time, median CPU time, peak RSS and the ratios
# (diskconv / qemu-img; below 1.00 means diskconv is faster).
#
# Every timed run writes a durable output: the old output is removed and everything dirty
# is flushed (`rm -f OUT; sync`, untimed), then `CMD && sync` is timed, so each tool pays
# for its own writeback and never for the other's. The tools alternate (qemu-img first in
# odd rounds, diskconv first in even ones) after one uncounted warm-up run each, and the
# median of ROUNDS runs (default 5) is printed, not the best.
#
# usage: benches/vs-qemu-img.sh [SIZE_BYTES] [PAIRS...]
#   SIZE_BYTES  workload size (default 2 GiB: the standard workload of
#               benches/gen-workload.py, deterministic for a given size)
#   PAIRS       subset of the pair names below (default: all)
# env: ROUNDS (default 5), BENCH_WORK (scratch folder, default bench-work/)
# needs: qemu-img (apt-get install qemu-utils), GNU time (apt-get install time), python3
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-$((2 << 30))}
shift || true
WORK=${BENCH_WORK:-bench-work}
ROUNDS=${ROUNDS:-5}
for tool in qemu-img python3 /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install qemu-utils time python3" >&2; exit 1; }
done
mkdir -p "$WORK"
cargo build --release --quiet
DC=target/release/diskconv
SRC="$WORK/workload-$SIZE.raw"
[ -f "$SRC" ] || python3 benches/gen-workload.py "$SRC" "$SIZE"

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
  # Convert and checksum, as an upload needs: diskconv streamed into sha256sum (no file),
  # and to a file with --digest, against qemu-img to a file then sha256sum of it. Compared
  # by their sha256, not by image.
  "raw->stdout-sha256|raw||raw|"
  "raw->file-digest|raw||raw|"
  # qcow2 streamed to stdout (redirected to a file, so it can be compared; the stream
  # sends zeros where a file would have holes) against qemu-img's file: beside raw->qcow2
  # (diskconv's file) this gives what streaming costs (the planning pass; with -c a second
  # compression).
  "raw->qcow2-stdout|raw||qcow2|"
  "raw->qcow2-c-stdout|raw||qcow2|-c"
)
want=("$@")

# One durable run: prints "wall_seconds cpu_seconds maxrss_kib", or "FAIL".
# usage: measure OUT CMD...
measure() {
  local out=$1; shift
  local t; t=$(mktemp)
  rm -f "$out"; sync
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

# Median of the numbers given as arguments.
median() { python3 -c 'import statistics, sys; print(statistics.median(map(float, sys.argv[1:])))' "$@"; }
ratio() { python3 -c "print(f'{$1 / max($2, 0.01):.2f}')"; }

# Wall time is the figure that counts; CPU time (user+sys) is printed beside it because it
# is far less disturbed by other load on the machine.
printf "%-18s %8s %8s %6s %8s %8s %6s %7s %8s\n" pair "dc s" "qemu s" ratio "dc cpu" "qemu cpu" ratio "dc MiB" "qemu MiB"
for p in "${PAIRS_ALL[@]}"; do
  IFS='|' read -r name ifmt imk ofmt flags <<<"$p"
  if [ ${#want[@]} -gt 0 ] && [[ ! " ${want[*]} " == *" $name "* ]]; then continue; fi
  if [ "$ifmt" = raw ]; then in=$SRC; else
    # shellcheck disable=SC2086
    in=$(prep "$name" "$ifmt" $imk)
  fi
  o1="$WORK/out-dc"; o2="$WORK/out-qemu"
  # shellcheck disable=SC2206
  qemu_cmd=(qemu-img convert -f "$ifmt" -O "$ofmt" $flags "$in" "$o2")
  # shellcheck disable=SC2206
  dc_cmd=("$DC" convert -f "$ifmt" -O "$ofmt" $flags "$in" "$o1")
  digest_pair=""
  case $name in
    "raw->stdout-sha256" | "raw->file-digest")
      digest_pair=1
      # Each writes "HASH  -" to its OUT; the image files are OUT.img.
      # shellcheck disable=SC2016
      qemu_cmd=(bash -c 'rm -f "$2.img" && qemu-img convert -f raw -O raw "$1" "$2.img" && sha256sum <"$2.img" >"$2"' sh "$in" "$o2")
      if [ "$name" = "raw->stdout-sha256" ]; then
        # shellcheck disable=SC2016
        dc_cmd=(bash -c 'set -o pipefail; "$3" convert -f raw -O raw "$1" - | sha256sum >"$2"' sh "$in" "$o1" "$DC")
      else
        # shellcheck disable=SC2016
        dc_cmd=(bash -c 'set -o pipefail; rm -f "$2.img" && "$3" convert -f raw -O raw --digest sha256 --output=json "$1" "$2.img" | grep -o "\"sha256\": \"[0-9a-f]*\"" | cut -d\" -f4 | sed "s/\$/  -/" >"$2"' sh "$in" "$o1" "$DC")
      fi
      ;;
    "raw->qcow2-stdout" | "raw->qcow2-c-stdout")
      # shellcheck disable=SC2016,SC2086
      dc_cmd=(bash -c '"$1" convert -f raw -O qcow2 $4 "$2" - >"$3"' sh "$DC" "$in" "$o1" "$flags")
      ;;
  esac
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
    printf "%-18s %s failed\n" "$name" "$failed"
  else
    ds=$(median "${dw[@]}"); ts=$(median "${qw[@]}")
    dc=$(median "${dcpu[@]}"); tc=$(median "${qcpu[@]}")
    printf "%-18s %8.2f %8.2f %6s %8.2f %8.2f %6s %7d %8d\n" "$name" "$ds" "$ts" "$(ratio "$ds" "$ts")" \
      "$dc" "$tc" "$(ratio "$dc" "$tc")" $((dm / 1024)) $((qm / 1024))
    # Same guest content, or the figure means nothing.
    if [ -n "$digest_pair" ]; then
      cmp -s "$o1" "$o2" || echo "    !! digests differ for $name: $(cat "$o1") vs $(cat "$o2")"
    else
      qemu-img compare -q -f "$ofmt" -F "$ofmt" "$o1" "$o2" || echo "    !! outputs differ for $name"
    fi
  fi
  rm -f "$o1" "$o2" "$o1.img" "$o2.img"
done
