#!/usr/bin/env bash
# A change of structure changes no output and reruns nothing (docs/testing.md):
#   bash tests/compare_revisions.sh BEFORE AFTER    (two commits of this repository)
# In one fresh clone: the demo DAG at BEFORE; then AFTER checked out over its results,
# where `snakemake -n all` must have nothing to do and `snakemake --summary` must be
# unchanged (dates aside); then the demo again from scratch at AFTER, whose results must
# equal BEFORE's (tests/compare_results.py). Runs with this checkout's .venv, about 10 min.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
before=$(git -C "$repo" rev-parse "${1:?usage: tests/compare_revisions.sh BEFORE AFTER}")
after=$(git -C "$repo" rev-parse "${2:?usage: tests/compare_revisions.sh BEFORE AFTER}")
bin=$repo/.venv/bin
work=$(mktemp -d)
git clone -q "$repo" "$work/run"
cd "$work/run"
export PYTHONPATH=$work/run/src  # the checked-out revision's package, not the installed one
run() { "$bin/snakemake" --profile profiles/local "$@"; }
git checkout -q "$before"
run all > "$work/before.log" 2>&1
run --summary all 2> /dev/null | cut -f1,3- > "$work/summary-before.tsv"
cp -a results "$work/results-before"
git checkout -q "$after"
run -n all > "$work/dry-run.log" 2>&1
if ! grep -q "Nothing to be done" "$work/dry-run.log"; then
    grep -E "reason|provenance|^total" "$work/dry-run.log" | sort | uniq -c | head -20
    echo "FAIL: $after reruns outputs $before made (log: $work/dry-run.log)"; exit 1
fi
echo "ok: nothing to rerun after checking out $after"
run --summary all 2> /dev/null | cut -f1,3- > "$work/summary-after.tsv"
diff "$work/summary-before.tsv" "$work/summary-after.tsv" > /dev/null \
    || { echo "FAIL: snakemake --summary changed"; exit 1; }
echo "ok: snakemake --summary unchanged"
rm -rf results .snakemake
run all > "$work/after.log" 2>&1
"$bin/python" -m tests.compare_results "$work/results-before" results
echo "ok: the same rows and arrays (work folder: $work)"
