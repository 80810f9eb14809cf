"""Reading a datum message a worker was given: anyone who can publish on df.datum.* can send one,
so what it names is checked before anything is made from it."""

from __future__ import annotations

from datumflow.broker.consumer import Unusable, decode
from datumflow.broker.messages import DatumTask
from datumflow.pfs.paths import BadPath, check_name, clean_path


def datum_task(data: bytes) -> DatumTask:
    task = decode(data, DatumTask, what="datum task")
    if task.more:  # a set that broker.set_parts did not split: it holds a set itself
        raise Unusable("datum task: a datum of a set carries more datums; sets do not nest")
    return task


def check_paths(task: DatumTask) -> None:
    """Refuse a datum whose input names or paths would lead out of its layout: the layout is
    made by joining them, and anyone who can publish on df.datum.* could send one."""
    for inp in task.inputs:
        check_name(inp.name, what="input")
        if inp.name == "out":
            raise BadPath("input name 'out' is reserved for the output")
        for path in (inp.root, *(f.path for f in inp.files)):
            if clean_path(path) != path.rstrip("/") and path != "/":
                raise BadPath(f"input {inp.name}: path {path!r} is not a clean absolute path")
