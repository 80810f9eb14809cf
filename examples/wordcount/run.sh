#!/bin/sh
# The word count from start to end: examples/wordcount/run.sh, from any directory.
#
# It uses the datumflow that `datumflow` commands find (DATUMFLOW_HOME, else ./.datumflow) when
# one is running; otherwise it starts one of its own in a temporary directory and stops it at the
# end. It prints the total number of words.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
if ! datumflow list repo >/dev/null 2>&1; then
    DATUMFLOW_HOME=$(mktemp -d)
    export DATUMFLOW_HOME
    datumflow up --detach
    trap 'datumflow down >/dev/null; rm -rf "$DATUMFLOW_HOME"' EXIT
fi
datumflow create repo texts
datumflow put file texts@master:/ -f "$here/texts" -r
datumflow create pipeline -f "$here/count.json"
datumflow create pipeline -f "$here/total.json"
datumflow wait commit texts@master
datumflow get file total@master:/total
