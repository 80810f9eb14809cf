"""Layouts on a real file system: each datum gets a fresh copy of its inputs and an empty `out`,
whatever the last datum left, while the layout's directories are reused."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from datumflow.broker.messages import DatumInput, DatumTask, FileRef
from datumflow.functions.worker import layout as layout_mod
from datumflow.functions.worker.layout import Layouts
from datumflow.storage.file import FileStore


def _store(tmp: Path, files: dict[str, bytes]) -> tuple[FileStore, list[FileRef]]:
    store = FileStore(tmp / "store")
    refs = []
    for path, data in files.items():
        key = hashlib.sha256(data).hexdigest()
        dest = Path(store.file(key))
        dest.parent.mkdir(exist_ok=True)
        dest.write_bytes(data)
        refs.append(FileRef(path=path, size=len(data), hash=key))
    return store, refs


def _task(refs: list[FileRef], *, name: str = "in") -> DatumTask:
    inp = DatumInput(name=name, repo="r", branch="master", commit="c", files=refs)
    return DatumTask(pipeline="p", version=1, job="j", datum="d", hash="h", inputs=[inp])


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def test_inputs_are_copied_whole_and_private(tmp_path: Path) -> None:
    big = os.urandom(layout_mod.COPY_WHOLE + 5)
    files = {"/a.txt": b"alpha", "/empty": b"", "/d/e/nested": b"deep", "/big": big}
    store, refs = _store(tmp_path, files)
    layouts = Layouts(scratch=tmp_path / "scratch", direct=False, memory=None)
    lay = layouts.pick(0, input_bytes=sum(r.size for r in refs), local=True)
    copied = layouts.prepare(lay, _task(refs), store.file)
    assert copied == sum(len(d) for d in files.values())
    assert _tree(lay.root / "in") == {k.lstrip("/"): v for k, v in files.items()}
    # The copy is the datum's own: changing it leaves the stored object as it was.
    (lay.root / "in" / "a.txt").write_bytes(b"changed")
    assert Path(store.file(refs[0].hash)).read_bytes() == b"alpha"


def test_the_next_datum_sees_nothing_the_last_one_left(tmp_path: Path) -> None:
    store, refs = _store(tmp_path, {"/one": b"1", "/two": b"2"})
    layouts = Layouts(scratch=tmp_path / "scratch", direct=False, memory=None)
    lay = layouts.pick(0, input_bytes=2, local=True)
    layouts.prepare(lay, _task(refs[:1]), store.file)
    # What user code may leave: files beside its inputs, a top-level directory, output.
    (lay.root / "in" / "junk").write_text("x")
    (lay.root / "stray").mkdir()
    (lay.link / "result").write_text("r")
    layouts.prepare(lay, _task(refs[1:]), store.file)
    assert sorted(os.listdir(lay.root)) == ["in", "out"]
    assert _tree(lay.root / "in") == {"two": b"2"}
    assert os.listdir(lay.out) == []


def test_out_is_emptied_unless_seen_empty_since(tmp_path: Path) -> None:
    store, refs = _store(tmp_path, {"/one": b"1"})
    layouts = Layouts(scratch=tmp_path / "scratch", direct=False, memory=None)
    lay = layouts.pick(0, input_bytes=1, local=True)
    layouts.prepare(lay, _task(refs), store.file)
    layouts.emptied(lay)  # the datum wrote nothing...
    layouts.prepare(lay, _task(refs), store.file)
    # ...and this one writes after prepare (err_cmd, say) without being seen empty again.
    (lay.out / "late").write_text("x")
    layouts.prepare(lay, _task(refs), store.file)
    assert os.listdir(lay.out) == []
    # A parked datum's output moves away and `out` is made anew, empty.
    (lay.out / "result").write_text("r")
    parked = layouts.park(lay)
    assert os.listdir(parked) == ["result"]
    layouts.prepare(lay, _task(refs), store.file)
    assert os.listdir(lay.out) == []
