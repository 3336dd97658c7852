#!/usr/bin/env bash
# Fuzz every target for N seconds each and print execs and coverage per target.
#
#   fuzz/run-all.sh [SECONDS] [TARGET...]      (default: 60 s; probe raw qcow2 vhd vmdk vdi qcow qed guest_scan guest_files guest_hive)
#
# Seeds come from fuzz/corpus/<target>/ (read only); inputs the fuzzer finds go to
# fuzz/work/<target>/ (ignored by git). Crashes land in fuzz/artifacts/<target>/: fix the
# bug, keep the file (minimise it with `cargo fuzz tmin`), and tests/pure/fuzz_corpus.rs replays
# it from then on. Needs cargo-fuzz (`cargo install cargo-fuzz`); works on stable through
# RUSTC_BOOTSTRAP=1.
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
if [ $# -gt 0 ]; then targets=("$@"); else targets=(probe raw qcow2 vhd vmdk vdi vhdx ova qcow qed guest_scan guest_files guest_hive); fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O || exit 1
mkdir -p logs
summary=()
status=0
for t in "${targets[@]}"; do
    mkdir -p "work/$t" "artifacts/$t" "corpus/$t"
    log="logs/$t.log"
    echo "== $t: ${secs}s"
    # -malloc_limit_mb: no single allocation may exceed 256 MiB (the readers cap tables at
    # 32 MiB); -rss_limit_mb is loose because AddressSanitizer itself holds a few hundred MiB.
    # -timeout: one input taking over 10 s is a hang.
    cargo fuzz run -O "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len=262144 -rss_limit_mb=2048 -malloc_limit_mb=256 -timeout=10 \
        -dict=diskconv.dict -print_final_stats=1 >"$log" 2>&1
    rc=$?
    last=$(grep -E '^#[0-9]+' "$log" | tail -1)
    execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$')
    cov=$(echo "$last" | grep -oE 'cov: [0-9]+' | grep -oE '[0-9]+')
    ft=$(echo "$last" | grep -oE 'ft: [0-9]+' | grep -oE '[0-9]+')
    corp=$(echo "$last" | grep -oE 'corp: [0-9]+' | grep -oE '[0-9]+')
    result=ok
    if [ $rc -ne 0 ]; then
        result="FAILED (rc $rc, see fuzz/$log; crash input in fuzz/artifacts/$t/)"
        status=1
    fi
    line=$(printf '%-6s execs=%-10s cov=%-6s ft=%-6s corpus=%-5s %s' "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result")
    echo "$line"
    summary+=("$line")
done
echo
echo "== summary (${secs}s per target)"
printf '%s\n' "${summary[@]}"
exit $status
