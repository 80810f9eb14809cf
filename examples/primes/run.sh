#!/bin/sh
# The primes example from start to end: examples/primes/run.sh, from any directory.
#
# It uses the datumflow that `datumflow` commands find (DATUMFLOW_HOME, else ./.datumflow) when
# one is running (started with this directory on its PYTHONPATH); otherwise it starts one of its
# own in a temporary directory and stops it at the end. It prints the results, then which worker
# ran each datum and how many times that worker had built its table by then.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
if ! datumflow list repo >/dev/null 2>&1; then
    DATUMFLOW_HOME=$(mktemp -d)
    export DATUMFLOW_HOME
    # The workers import `primes` (transform.function "primes:classify"): they find it here.
    PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" datumflow up --detach
    trap 'datumflow down >/dev/null; rm -rf "$DATUMFLOW_HOME"' EXIT
fi
datumflow create repo numbers
datumflow put file numbers@master:/ -f "$here/numbers" -r
datumflow create pipeline -f "$here/primes.json"
datumflow create pipeline -f "$here/summary.json"
datumflow wait commit numbers@master
datumflow get file summary@master:/results.txt
# One line per datum: the worker's pid, when it built its table, how many times (1), and how
# many datums that worker had run with it.
datumflow get file summary@master:/workers.jsonl
