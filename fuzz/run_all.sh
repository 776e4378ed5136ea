#!/bin/sh
# Fuzzes every target in turn (one libFuzzer job each, niced), growing fuzz/corpus-work/<target>/
# from the committed corpus and the seeds, then minimizes the result into fuzz/corpus/<target>/.
# Usage, from the repository root: fuzz/run_all.sh [seconds per target, default 600] [targets...]
# Logs: fuzz/corpus-work/<target>.log; crashes: fuzz/artifacts/<target>/.
set -u
secs=${1:-600}
[ $# -gt 0 ] && shift
targets=${*:-"codec wal_verify tarstream manifest conninfo history target"}
cd "$(dirname "$0")"
[ -d corpus-work ] || python3 make_seeds.py
cargo +nightly fuzz build -s none || exit 1
for t in $targets; do
    mkdir -p "corpus-work/$t" "corpus/$t"
    cp -n corpus/"$t"/* "corpus-work/$t/" 2>/dev/null
    nice -n 10 cargo +nightly fuzz run -s none "$t" "corpus-work/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 > "corpus-work/$t.log" 2>&1
    rc=$?
    echo "$t: exit $rc, $(grep -o '^Done [0-9]* runs' "corpus-work/$t.log")"
done
# Minimize: a small set of inputs with the same coverage (libFuzzer -set_cover_merge=1).
bin=target/x86_64-unknown-linux-gnu/release
for t in $targets; do
    rm -rf "corpus-work/$t.min" && mkdir -p "corpus-work/$t.min"
    nice -n 10 "$bin/$t" -set_cover_merge=1 "corpus-work/$t.min" "corpus-work/$t" > "corpus-work/$t.merge.log" 2>&1
    rm -rf "corpus/$t" && mv "corpus-work/$t.min" "corpus/$t"
    echo "$t: $(ls "corpus/$t" | wc -l) inputs, $(cat "corpus/$t"/* | wc -c) bytes kept"
done
