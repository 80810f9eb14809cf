#!/bin/sh
# The edges example from start to end: examples/edges/run.sh, from any directory.
#
# It uses the datumflow that `datumflow` commands find (DATUMFLOW_HOME, else ./.datumflow) when
# one is running (started with this directory on its PYTHONPATH); otherwise it starts one of its
# own in a temporary directory and stops it at the end. It writes ./house-edges.png (the edges
# of one image) and ./montage.png (every image beside its edges).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
if ! datumflow list repo >/dev/null 2>&1; then
    DATUMFLOW_HOME=$(mktemp -d)
    export DATUMFLOW_HOME
    # The workers run `python3 -m edges` and `python3 -m montage`: they find them here.
    PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" datumflow up --detach
    trap 'datumflow down >/dev/null; rm -rf "$DATUMFLOW_HOME"' EXIT
fi
datumflow create repo images
datumflow put file images@master:/ -f "$here/images" -r
datumflow create pipeline -f "$here/edges.json"
datumflow create pipeline -f "$here/montage.json"
datumflow wait commit images@master
datumflow list job
datumflow get file edges@master:/house.png -o house-edges.png
datumflow get file montage@master:/montage.png -o montage.png
echo "wrote house-edges.png and montage.png"
