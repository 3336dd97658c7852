#!/usr/bin/env bash
# Sparsify against plain conversion, issue 13's benchmark: a 2 GiB raw disk with a GPT
# partition holding ext4, where 1 GiB of files was written and deleted and then 300 MiB
# of files written (the deleted data is still on the disk, not zero). Compared:
#   diskconv sparsify -O qcow2        (drops what ext4's bitmaps mark free)
#   qemu-img convert -O qcow2         (keeps the deleted data: it is not zero)
#   diskconv convert -O qcow2         (the same work as qemu-img, for reference)
#   virt-sparsify --convert qcow2     (when installed and able to run its appliance)
# Reported: median wall time of ROUNDS alternating runs and the output's size.
#
# The files are written and deleted with debugfs (no mount needed). Until diskconv's
# ext4 scanner is in, sparsify drops nothing here and the sizes come out alike.
#
# Usage: benches/sparsify-vs-qemu-img.sh [ROUNDS]
#   (needs qemu-img, e2fsprogs, gdisk, GNU time; about 4 GiB free in $TMPDIR)
# DISK_MIB=128 scales the whole workload down (deleted half, kept 300/2048 of the disk)
# to try the script quickly; DISKCONV=path uses that binary instead of building one.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
DISK_MIB=${DISK_MIB:-2048}
if [ -z "${DISKCONV:-}" ]; then
  cargo build --release -q
  DISKCONV=$PWD/target/release/diskconv
fi
D=$DISKCONV
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT

DISK=$W/disk.raw
FS=$W/fs.img
START=2048                     # first sector of the partition
SIZE=$((DISK_MIB << 20))
OLD_MIB=$((DISK_MIB / 16))      # 8 files: half the disk, written then deleted
NEW_MIB=$((DISK_MIB * 100 / 2048)) # 3 files: 300 MiB of 2 GiB, kept
PART=$((SIZE - START * 512 - (1 << 20)))   # leaves the backup GPT its 1 MiB at the end

echo "building the image in $W ..."
truncate -s "$PART" "$FS"
mkfs.ext4 -q -F -b 4096 "$FS"
# 1 GiB of files, written then deleted: their blocks are free but keep their bytes.
for i in 1 2 3 4 5 6 7 8; do
  head -c "${OLD_MIB}M" /dev/urandom > "$W/old$i"
  debugfs -w -R "write $W/old$i old$i" "$FS" >/dev/null 2>&1
  rm "$W/old$i"
done
for i in 1 2 3 4 5 6 7 8; do debugfs -w -R "rm old$i" "$FS" >/dev/null 2>&1; done
# 300 MiB of files that stay.
for i in 1 2 3; do
  head -c "${NEW_MIB}M" /dev/urandom > "$W/new$i"
  debugfs -w -R "write $W/new$i new$i" "$FS" >/dev/null 2>&1
  rm "$W/new$i"
done
e2fsck -fn "$FS" >/dev/null 2>&1
truncate -s "$SIZE" "$DISK"
sgdisk -n "1:$START:$((START + PART / 512 - 1))" -t 1:8300 "$DISK" >/dev/null
dd if="$FS" of="$DISK" bs=1M seek=$((START * 512)) oflag=seek_bytes conv=sparse,notrunc status=none
rm "$FS"
echo "disk: $(du -h --apparent-size "$DISK" | cut -f1) virtual, $(du -h "$DISK" | cut -f1) allocated"

time_one() { # out cmd...: seconds
  local out=$1; shift
  rm -f "$out"
  /usr/bin/time -f %e -o "$W/t" "$@" >/dev/null 2>"$W/err" || { cat "$W/err" >&2; return 1; }
  cat "$W/t"
}
median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

declare -A times
tools=(sparsify qemu convert)
for _ in $(seq "$ROUNDS"); do
  times[sparsify]+="$(time_one "$W/s.qcow2" "$D" sparsify -q -f raw -O qcow2 "$DISK" "$W/s.qcow2") "
  times[qemu]+="$(time_one "$W/q.qcow2" qemu-img convert -f raw -O qcow2 "$DISK" "$W/q.qcow2") "
  times[convert]+="$(time_one "$W/c.qcow2" "$D" convert -f raw -O qcow2 "$DISK" "$W/c.qcow2") "
done
declare -A outs=([sparsify]="$W/s.qcow2" [qemu]="$W/q.qcow2" [convert]="$W/c.qcow2")
declare -A names=([sparsify]="diskconv sparsify -O qcow2" [qemu]="qemu-img convert -O qcow2" [convert]="diskconv convert -O qcow2")
for t in "${tools[@]}"; do
  m=$(printf '%s\n' ${times[$t]} | median)
  printf '%-30s median %7ss   output %6s MiB\n' "${names[$t]}" "$m" \
    "$(( $(stat -c %s "${outs[$t]}") >> 20 ))"
done
"$D" sparsify -f raw -O qcow2 "$DISK" "$W/s.qcow2" | sed 's/^/  /'
qemu-img compare -q "$W/s.qcow2" "$W/q.qcow2" && echo "  (sparsify dropped nothing: outputs identical)" || true

if command -v virt-sparsify >/dev/null 2>&1; then
  if t=$(time_one "$W/v.qcow2" virt-sparsify -q --format raw --convert qcow2 "$DISK" "$W/v.qcow2"); then
    printf '%-30s once   %7ss   output %6s MiB\n' "virt-sparsify --convert qcow2" "$t" \
      "$(( $(stat -c %s "$W/v.qcow2") >> 20 ))"
  else
    echo "virt-sparsify: installed but could not run here (it boots a libguestfs appliance: needs a kernel image and, for speed, KVM)"
  fi
else
  echo "virt-sparsify: not installed (libguestfs-tools; it boots a VM appliance, needs a kernel image and a hypervisor)"
fi
