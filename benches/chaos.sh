#!/usr/bin/env bash
# benches/chaos.sh [N=50]: the chaos suite (tests/chaos.rs) at N iterations per mode, then a
# summary table of its CHAOS-RESULT lines, the violations and the notes.
#
#   CHAOS_THREADS   modes run at once (default 2, like `cargo test` on 2 cores)
#   CHAOS_FILTER    test name filter (default chaos_, every mode)
#   CHAOS_LOG       where the full output goes (default target/chaos-N<N>-<time>.log)
#   WALAGENT_CHAOS_SEED  replay the random choices of an earlier run (each mode prints its seed)
#
# Exit status: cargo's (non-zero when any mode found a violation).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
LOG_NAME=chaos
# shellcheck source=benches/lib.sh
source benches/lib.sh

N=${1:-50}
[[ $N =~ ^[0-9]+$ && $N -gt 0 ]] || die "usage: benches/chaos.sh [N]  (N: iterations per mode)"
threads=${CHAOS_THREADS:-2}
out=${CHAOS_LOG:-target/chaos-N$N-$(date -u +%Y%m%dT%H%M%SZ).log}

log "building the chaos test target"
cargo test --locked --test chaos --no-run >/dev/null 2>&1 || die "cargo test --no-run failed"
log "$N iterations per mode, $threads mode(s) at a time; load average $(cut -d' ' -f1-3 /proc/loadavg)"
log "full output: $out"
t0=$(date +%s.%N)
WALAGENT_CHAOS_N=$N cargo test --locked --test chaos -- --nocapture --test-threads "$threads" \
  "${CHAOS_FILTER:-chaos_}" >"$out" 2>&1
rc=$?
t1=$(date +%s.%N)

echo
echo "| mode | iterations | kills | faults | invariant checks | segments verified | MiB verified | violations | wall s |"
echo "|---|---|---|---|---|---|---|---|---|"
grep -a '^CHAOS-RESULT ' "$out" | sort | awk '
  {
    delete kv; skipped = ""
    if (match($0, /skipped="[^"]*"/)) skipped = substr($0, RSTART + 9, RLENGTH - 10)
    for (i = 2; i <= NF; i++) { split($i, p, "="); kv[p[1]] = p[2] }
    if (skipped != "") {
      printf "| %s | skipped: %s | | | | | | | |\n", kv["mode"], skipped
      next
    }
    printf "| %s | %s | %s | %s | %s | %s | %.0f | %s | %s |\n", kv["mode"], kv["iterations"], kv["kills"],
      kv["faults"], kv["checks"], kv["segments"], kv["bytes"] / 1048576, kv["violations"], kv["wall_s"]
    it += kv["iterations"]; k += kv["kills"]; f += kv["faults"]; c += kv["checks"]; s += kv["segments"]
    b += kv["bytes"]; v += kv["violations"]
  }
  END { printf "| **all** | %d | %d | %d | %d | %d | %.0f | %d | |\n", it, k, f, c, s, b / 1048576, v }'
seeds=$(grep -a '^CHAOS-RESULT ' "$out" | grep -o 'seed=[0-9]*' | sort -u | tr '\n' ' ')
printf '\nwall time %.0f s for the whole run (%s); %s\n' "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b - a}')" \
  "load average now $(cut -d' ' -f1-3 /proc/loadavg)" "${seeds:-no seed printed}"
missing=$(grep -a -E '^test chaos_.* \.\.\. FAILED' "$out" | awk '{print $2}' | while read -r t; do
  m=${t#chaos_}; grep -aq "^CHAOS-RESULT mode=$m " "$out" || echo "$t"; done)
[[ -n $missing ]] && printf '\nfailed without a result line (a panic in the harness; see the log): %s\n' "$missing"
if grep -aq '^CHAOS-VIOLATION ' "$out"; then
  echo
  echo "violations (first 40):"
  grep -a '^CHAOS-VIOLATION ' "$out" | head -40 | sed 's/^CHAOS-VIOLATION /  /'
fi
if grep -aq '^CHAOS-NOTE ' "$out"; then
  echo
  echo "notes:"
  grep -a '^CHAOS-NOTE ' "$out" | sed -E 's/^CHAOS-NOTE //; s#/[^ ]*walagent-tests/[^ ]*#<dir>#g' | sort -u | sed 's/^/  /'
fi
exit $rc
