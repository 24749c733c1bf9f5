#!/usr/bin/env bash
# Mutation testing of the runtime and the validator with mutmut (requirements-mutation.txt).
# Not part of CI or `make test`: it is slow (all 2457 mutants take hours on 2 shared cores; the
# recorded run and its times are in docs/TESTING.md).
#
# Mutated: runtime/{state,runtime,generation}.py, runtime/backends/onnxruntime.py and
# export/validate.py. Tests: the fast, in-process ones that reach them (the list is in
# scripts/mutation/setup.cfg); mutmut runs, for each mutant, only the tests that called the
# mutated function in its first (stats) run.
#
# Usage: scripts/mutation.sh [--fresh] [MUTANT_GLOB...]
#   --fresh       forget earlier results (otherwise a rerun resumes and retests nothing
#                 that already has a result, except the mutants named by MUTANT_GLOB); the
#                 exported test bundles are kept (rm -rf .mutation to re-export them too)
#   MUTANT_GLOB   e.g. 'rmt_runtime.state*' to (re)test only those mutants
# Environment: JOBS (parallel mutants, default: number of cores).
#
# Work happens in .mutation/ (git-ignored): the three source folders are copied there
# under their import names (src/rmt_runtime, src/rmt_export, src/rmt_model), because mutmut
# names a mutant after its file's path and must find the same name at import time.
# Reading the results: the summary printed at the end gives, per file, total / killed /
# timeout / survived; survivors listed in scripts/mutation/equivalent.txt (judged
# equivalent, reasons in docs/TESTING.md) are counted apart. To see a survivor's diff:
#   (cd .mutation && ../.venv/bin/mutmut show NAME)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAGE=$ROOT/.mutation

fresh=0
if [[ "${1:-}" == "--fresh" ]]; then fresh=1; shift; fi

make --no-print-directory .venv/.installed
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-mutation.txt

if (( fresh )); then rm -rf "$STAGE/mutants"; fi
mkdir -p "$STAGE/src"
# Copies keep their modification times: mutmut regenerates a file's mutants (and forgets
# their results) only when its source is newer than its mutants.
for pair in rmt_runtime:runtime rmt_export:export rmt_model:rmt_model; do
    name=${pair%%:*} folder=${pair#*:}
    rm -rf "$STAGE/src/$name"
    cp -a "$folder" "$STAGE/src/$name"
done
rm -rf "$STAGE/tests"
cp -a tests pytest.ini "$STAGE/"
cp -a scripts/mutation/setup.cfg scripts/mutation/rmt_mutation_plugin.py "$STAGE/"
find "$STAGE" -path "$STAGE/mutants" -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Exported test bundles, made once by the unmutated code and shared by every mutant.
export RMT_MUTATION_CACHE=$STAGE/bundle-cache
export PYTHONDONTWRITEBYTECODE=1

cd "$STAGE"
start=$(date +%s)
status=0
"$ROOT/.venv/bin/mutmut" run --max-children "${JOBS:-$(nproc)}" "$@" || status=$?
end=$(date +%s)
echo
echo "mutmut run exit status $status, wall time $(( (end - start) / 60 )) min $(( (end - start) % 60 )) s"
"$ROOT/.venv/bin/python" "$ROOT/scripts/mutation/summary.py" --equivalent "$ROOT/scripts/mutation/equivalent.txt"
exit $status
