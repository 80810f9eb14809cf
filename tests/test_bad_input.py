"""Bad input, catalogued: each kind ends in a clear error (a dead letter, a failed datum, a refused
command) and loses nothing else: the functions keep running, the repos stay as they were, and the
next good input is processed exactly.

The catalogue, by where the input comes in:
- wire messages on every subject a function consumes (commit, datum, result, job, max-deliveries
  advisory): malformed, truncated, oversized, of an unknown version, of the wrong shape, and
  well-formed messages that name paths a repo cannot hold;
- pipeline specs: every kind of error `create pipeline` can meet;
- repo paths: `..`, NUL, overlong names, relative forms;
- user code: output that leaves /pfs/out by a symlink (absolute, `..`, to a directory), code that
  hangs past datum_timeout, forks children that outlive it, fills its disk, or prints a gigabyte.

Logs: a datum's output is kept up to sandbox.LOG_CAP bytes; the rest is counted and dropped with a
note at the end. The datum itself is judged by its exit code, not by how much it printed: a datum
that printed a gigabyte and exited 0 succeeds, with a truncated log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import msgspec
import nats
import pytest

from datumflow.broker import subjects
from datumflow.broker.messages import (
    MAX_MESSAGE,
    CommitEvent,
    DatumInput,
    DatumResult,
    DatumResults,
    DatumTask,
    DeadLetter,
    FileRef,
    JobPlanned,
    RerunRequest,
)
from datumflow.errors import SpecError
from datumflow.functions.worker import sandbox
from datumflow.pfs.datums import check_input
from datumflow.pfs.paths import BadPath, clean_path
from datumflow.spec import load_spec
from tests.faults.harness import make_dataset as _dataset
from tests.faults.harness import stream_count
from tests.helpers import (
    Cluster,
    create_pipeline,
    dead,
    eventually,
    put_files,
    results_of,
    wait_job_done,
    wait_until,
)

COPY = {
    "pipeline": {"name": "copy"},
    "input": {"pfs": {"repo": "src", "glob": "/*"}},
    "transform": {"cmd": ["sh", "-c", "cp -r /pfs/src/. /pfs/out/"]},
}
"""The pipeline the bad messages are aimed at: each file of `src` copied as it is."""
ADVISORY = subjects.max_deliveries_advisory(subjects.DATUMS_STREAM, "df-worker-copy")


def _valid(subject_kind: str, key: str) -> dict:
    """A message of the subject's type that decodes, to be broken in the ways below."""
    if subject_kind == "commit":
        return msgspec.to_builtins(
            CommitEvent(repo="src", commit="c" * 32, files=[FileRef(path="/x", hash=key, size=2)])
        )
    if subject_kind == "datum":
        return msgspec.to_builtins(
            DatumTask(
                pipeline="copy",
                version=1,
                job="nojob",
                datum="d" * 64,
                hash="h",
                inputs=[
                    DatumInput(
                        name="src",
                        repo="src",
                        branch="master",
                        commit="c",
                        files=[FileRef(path="/x", hash=key, size=2)],
                    )
                ],
            )
        )
    if subject_kind == "result":
        return msgspec.to_builtins(
            DatumResult(pipeline="copy", job="nojob", datum="d" * 64, state="success")
        )
    if subject_kind == "results":
        one = DatumResult(pipeline="copy", job="nojob", datum="d" * 64, state="success")
        return msgspec.to_builtins(DatumResults(pipeline="copy", job="nojob", results=[one]))
    if subject_kind == "job":
        return msgspec.to_builtins(JobPlanned(pipeline="copy", job="nojob", data_total=1))
    if subject_kind == "rerun":
        return msgspec.to_builtins(RerunRequest(pipeline="copy", job="nojob", created=1.0))
    if subject_kind == "advisory":
        return {"stream": subjects.DATUMS_STREAM, "consumer": "df-worker-copy", "stream_seq": 1}
    raise AssertionError(subject_kind)


SUBJECTS = {
    "commit": (subjects.commit("src"), "planner"),
    "datum": (subjects.datum("copy"), "worker"),
    "result": (subjects.result("copy", "nojob"), "committer"),
    "results": (subjects.results("copy", "nojob"), "committer"),
    "job": (subjects.job_planned("copy", "nojob"), "committer"),
    "advisory": (ADVISORY, "committer"),
    "rerun": (subjects.rerun("copy"), "planner"),
}


def _breakages(kind: str, valid: dict) -> dict[str, tuple[bytes, str]]:
    """name → (payload, a fragment the dead letter's reason must hold)."""
    text = json.dumps(valid).encode()
    wrong = dict(valid)
    first = next(k for k in valid if k != "v")
    wrong[first] = 12345  # every first field is a string: the wrong type
    out = {
        "malformed": (b"\x00\xff{not json", "not valid JSON"),
        "truncated": (text[: len(text) // 2], "not valid JSON"),
        "oversized": (b'{"v": 1, "pad": "' + b"\x01" * (MAX_MESSAGE + 4096) + b'"}', "byte limit"),
        "wrong shape": (json.dumps(wrong).encode(), "Expected `"),
        "not an object": (b"[1, 2, 3]", "Expected `object`"),
    }
    if kind == "advisory":
        # The server's advisories carry no datumflow version, and the committer decodes them with
        # its own error: "max-deliveries advisory: <what msgspec says>".
        return {name: (payload, "max-deliveries advisory: ") for name, (payload, _) in out.items()}
    out["unknown version"] = (json.dumps({**valid, "v": 99}).encode(), "v=99")
    if kind == "results":
        # One message, one job: a result of another job among them is refused, not counted.
        stray = dict(valid["results"][0], job="otherjob")
        out["another job's result"] = (
            json.dumps({**valid, "results": [*valid["results"], stray]}).encode(),
            "a result of another job among them",
        )
    if kind == "rerun":
        out["another pipeline's"] = (
            json.dumps(dict(valid, pipeline="src")).encode(),
            "a rerun request for pipeline src on df.rerun.copy",
        )
    if kind == "commit":
        for name, path, reason in [
            ("path with ..", "/a/../../etc/passwd", "'..' segment"),
            ("path with NUL", "/a\x00b", "NUL byte"),
            ("overlong name", "/" + "n" * 300, "longer than 255 bytes"),
            ("overlong path", "/d" * 2100, "the limit is 4096"),
        ]:
            event = dict(valid, commit=f"{abs(hash(name)):032d}"[:32])
            event["files"] = [dict(valid["files"][0], path=path)]
            out[name] = (json.dumps(event).encode(), reason)
    return out


async def _letters(js, count: int, timeout: float) -> dict[str, DeadLetter]:  # type: ignore[no-untyped-def]
    sub = await js.pull_subscribe("df.dead.>", stream=subjects.DEAD_STREAM)
    found: dict[str, DeadLetter] = {}

    async def fetch() -> int:
        try:
            msgs = await sub.fetch(batch=64, timeout=1)
        except TimeoutError:  # nats-py raises either its own or asyncio's
            msgs = []
        for msg in msgs:
            letter = msgspec.json.decode(msg.data, type=DeadLetter)
            found[letter.headers.get("Nats-Msg-Id", "?")] = letter
            await msg.ack()
        return len(found)

    # Short of `count` at the deadline, what came is returned: the callers name what is missing.
    with contextlib.suppress(AssertionError):
        await eventually(fetch, until=lambda n: n >= count, timeout=timeout, interval=0)
    await sub.unsubscribe()
    return found


@pytest.mark.asyncio
async def test_bad_messages_on_every_subject_are_dead_lettered_and_nothing_else_is_lost(
    cluster: Cluster, tmp_path: Path
) -> None:
    data = _dataset(6, seed=21)
    marks = tmp_path / "marks"
    marks.mkdir()
    await put_files(cluster, "src", data.files)
    create_pipeline(cluster, tmp_path, COPY)
    first = await wait_job_done(cluster, "copy", timeout=90)
    assert first[0].state == "success"
    async with cluster.api() as api:
        key, _ = await api.store.put_bytes(b"x\n")
        src_head = await api.repos.head("src", "master")

    sent: dict[str, tuple[str, str, str]] = {}  # msg id → (function, what, reason fragment)
    nc = await nats.connect(cluster.server.url)
    try:
        js = nc.jetstream()
        for kind, (subject, function) in SUBJECTS.items():
            for name, (payload, reason) in _breakages(kind, _valid(kind, key)).items():
                msg_id = f"bad-{kind}-{name}".replace(" ", "-")
                if subject.startswith("$JS"):
                    # The server publishes advisories on core NATS; the stream keeps them.
                    await nc.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
                else:
                    await js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
                sent[msg_id] = (function, f"{name} on {kind} ({subject})", reason)
        letters = await _letters(js, len(sent), timeout=60)
    finally:
        await nc.close()

    missing = [what for msg_id, (_, what, _) in sent.items() if msg_id not in letters]
    assert not missing, f"no dead letter for: {missing}"
    for msg_id, (function, what, reason) in sent.items():
        letter = letters[msg_id]
        assert letter.function == function, (what, letter.function)
        assert reason in letter.reason, f"{what}: reason {letter.reason!r} lacks {reason!r}"
        assert len(letter.data) <= MAX_MESSAGE

    # Bad specs and paths through the CLI: refused with the reason, nothing created.
    cases = {
        "missing.json": (
            {**BASE, "pipeline": {"name": "p2"}, "input": {"pfs": {"repo": "nope", "glob": "/*"}}},
            "repo nope does not exist",
        ),
        "self.json": (
            {**BASE, "pipeline": {"name": "p3"}, "input": {"pfs": {"repo": "p3", "glob": "/*"}}},
            "cannot read its own output",
        ),
        "again.json": ({**BASE, "pipeline": {"name": "copy"}}, "already exists"),
        "scaling.json": (
            {**BASE, "pipeline": {"name": "p4"}, "scaling": {"lag_threshold": 0}},
            "scaling.lag_threshold: must be >= 1",
        ),
        "repo-taken.json": (
            {**BASE, "pipeline": {"name": "src"}, "input": {"pfs": {"repo": "copy", "glob": "/*"}}},
            "repo src already exists",
        ),
    }
    for name, (spec, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(spec))
        result = cluster.cli("create", "pipeline", "-f", str(tmp_path / name), check=False)
        assert result.returncode == 1 and message in result.stderr, (name, result.stderr)
    local = tmp_path / "f.txt"
    local.write_text("f\n")
    result = cluster.cli(
        "put", "file", "src@master:/../../etc/passwd", "-f", str(local), check=False
    )
    assert result.returncode == 1 and "'..'" in result.stderr, result.stderr
    async with cluster.api() as api:
        assert [p.name for p in await api.pipelines.list()] == ["copy"]
        assert sorted(r.name for r in await api.repos.list_repos()) == ["copy", "src"]

    # Nothing else lost: no function died, the repos are as they were, and a good commit after
    # all that garbage is processed exactly.
    assert "exited with code" not in cluster.log("up"), cluster.log("up")
    async with cluster.api() as api:
        assert (await api.repos.head("src", "master")).id == src_head.id
    second = _dataset(6, seed=22)
    await put_files(cluster, "src", second.files, create=False)
    jobs = await wait_job_done(cluster, "copy", count=2, timeout=90)
    newest = jobs[0]
    assert newest.state == "success", newest.reason
    assert (newest.data_total, newest.data_processed, newest.data_failed) == (6, 6, 0)
    async with cluster.api() as api:
        from datumflow.pfs import manifest

        head = await api.repos.head("copy", "master")
        got = {
            f.path: await api.store.get_bytes(f.hash)
            for f in await manifest.read(api.store, head.manifest)
        }
    assert got == second.files


# -- crafted datum messages ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_datum_message_cannot_write_outside_the_datum(
    cluster: Cluster, tmp_path: Path
) -> None:
    await put_files(cluster, "src", _dataset(1, seed=31).files)
    create_pipeline(cluster, tmp_path, COPY)
    await wait_job_done(cluster, "copy", timeout=90)
    target = tmp_path / "escaped"
    async with cluster.api() as api:
        key, size = await api.store.put_bytes(b"planted by a datum message\n")
    depth = "/".join([".."] * 30)
    tasks = {
        "by path": DatumInput(
            name="src",
            repo="src",
            branch="master",
            commit="c",
            files=[FileRef(path=f"/{depth}{target}/by-path", hash=key, size=size)],
        ),
        "by input name": DatumInput(
            name=f"{depth}{target}",
            repo="src",
            branch="master",
            commit="c",
            files=[FileRef(path="/by-name", hash=key, size=size)],
        ),
    }
    nc = await nats.connect(cluster.server.url)
    try:
        js = nc.jetstream()
        for i, (name, inp) in enumerate(tasks.items()):
            task = DatumTask(
                pipeline="copy", version=1, job="crafted", datum=f"{i:064d}", hash="h", inputs=[inp]
            )
            msg_id = f"crafted-{name}".replace(" ", "-")
            await js.publish(
                subjects.datum("copy"), msgspec.json.encode(task), headers={"Nats-Msg-Id": msg_id}
            )
        # Each is refused with its reason on the worker's dead-letter subject.
        letters = await _letters(js, len(tasks), timeout=30)
    finally:
        await nc.close()
    assert set(letters) == {"crafted-by-path", "crafted-by-input-name"}, letters
    assert "contains a '..' segment" in letters["crafted-by-path"].reason
    assert "input name" in letters["crafted-by-input-name"].reason
    assert {letter.function for letter in letters.values()} == {"worker"}
    # The queue drains, and nothing landed outside the datum.
    await eventually(
        lambda: stream_count(cluster, subjects.DATUMS_STREAM, subjects.datum("copy")),
        until=lambda queued: queued == 0,
        timeout=30,
        what="the crafted datums to be handled",
    )
    assert not target.exists(), sorted(str(p) for p in target.rglob("*"))


# -- specs --------------------------------------------------------------------------------------

BASE = {
    "pipeline": {"name": "p"},
    "input": {"pfs": {"repo": "src", "glob": "/*"}},
    "transform": {"cmd": ["true"]},
}

SPEC_ERRORS = [
    ("not JSON or YAML", "{: [", "neither valid JSON nor valid YAML"),
    ("a list", "- a\n- b\n", "a pipeline spec is a mapping"),
    ("unknown field", {"pipline": {"name": "p"}}, "unknown field `pipline`"),
    ("no name", {"pipeline": {}}, "pipeline: Object missing required field `name`"),
    ("bad name", {"pipeline": {"name": "a/b"}}, "pipeline.name"),
    ("overlong name", {"pipeline": {"name": "p" * 64}}, "pipeline.name"),
    ("no input", {"input": None}, "input"),
    ("two input kinds", {"input": {"pfs": BASE["input"]["pfs"], "cross": []}}, "found: pfs, cross"),
    ("empty cross", {"input": {"cross": []}}, "input.cross: needs at least one input"),
    ("no glob", {"input": {"pfs": {"repo": "src"}}}, "missing required field `glob`"),
    ("bad glob", {"input": {"pfs": {"repo": "src", "glob": "/[a"}}}, "input.pfs.glob"),
    (
        "join_on without a capture",
        {
            "input": {
                "join": [
                    {"pfs": {"repo": "a", "glob": "/*", "join_on": "$1"}},
                    {"pfs": {"repo": "b", "glob": "/(*)", "join_on": "$1"}},
                ]
            }
        },
        "input.join[0].pfs.join_on",
    ),
    ("input named out", {"input": {"pfs": {"repo": "out", "glob": "/*"}}}, "reserved for /pfs/out"),
    (
        "one name twice in a cross",
        {
            "input": {
                "cross": [
                    {"pfs": {"repo": "src", "glob": "/*"}},
                    {"pfs": {"repo": "src", "glob": "/"}},
                ]
            }
        },
        "already used in this cross",
    ),
    ("bad repo name", {"input": {"pfs": {"repo": "../etc", "glob": "/*"}}}, "input.pfs.repo"),
    ("no cmd", {"transform": {}}, "transform.cmd: required"),
    ("cmd not a list", {"transform": {"cmd": "echo hi"}}, "transform.cmd: Expected `array`"),
    ("negative parallelism", {"parallelism_spec": {"constant": -1}}, "must be >= 0"),
    (
        "constant and coefficient",
        {"parallelism_spec": {"constant": 2, "coefficient": 1.0}},
        "exactly one",
    ),
    ("no tries", {"datum_tries": 0}, "datum_tries: must be >= 1"),
    ("bad datum_timeout", {"datum_timeout": "forever"}, "datum_timeout"),
    ("bad job_timeout", {"job_timeout": "10 minutes"}, "job_timeout"),
    ("bad output branch", {"output_branch": "a b"}, "output_branch"),
    ("bad reprocess_spec", {"reprocess_spec": "sometimes"}, "reprocess_spec"),
]


@pytest.mark.parametrize(
    ("what", "change", "message"), SPEC_ERRORS, ids=[c[0] for c in SPEC_ERRORS]
)
def test_every_kind_of_spec_error_names_its_field(what: str, change: object, message: str) -> None:
    if isinstance(change, str):
        text = change
    else:
        doc = {**BASE, **change}  # type: ignore[dict-item]
        doc = {k: v for k, v in doc.items() if v is not None}
        text = json.dumps(doc)
    with pytest.raises(SpecError) as info:
        check_input(load_spec(text, source="p.json").input)
    assert message in str(info.value), str(info.value)


# -- repo paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/a/../b", "'..' segment"),
        ("../etc/passwd", "'..' segment"),
        ("/..", "'..' segment"),
        ("/a\x00b", "NUL byte"),
        ("/" + "x" * 256, "longer than 255 bytes"),
        ("/" + "é" * 128, "longer than 255 bytes"),  # 256 bytes in UTF-8
        ("/d" * 2049, "the limit is 4096"),
    ],
)
def test_bad_repo_paths_are_refused(path: str, message: str) -> None:
    with pytest.raises(BadPath, match=message.replace("(", r"\(")):
        clean_path(path)


def test_repo_paths_are_made_absolute_and_plain() -> None:
    assert clean_path("etc/passwd") == "/etc/passwd"
    assert clean_path("//a///./b/") == "/a/b"
    assert clean_path("/" + "x" * 255) == "/" + "x" * 255


# -- user code ----------------------------------------------------------------------------------

UNRULY = r"""
f=$(cd /pfs/in && ls)
case "$f" in
  a-hang) sleep 600 ;;
  b-fork) setsid sh -c 'read -r pid _ < /proc/self/stat; echo $pid > "$MARKS/fork.pid"; exec sleep 300' &
          while [ ! -s "$MARKS/fork.pid" ]; do sleep 0.01; done; cp /pfs/in/* /pfs/out/ ;;
  c-symlink) ln -s /etc/passwd /pfs/out/leak ;;
  d-dotdot) ln -s ../in/d-dotdot /pfs/out/up ;;
  e-dirlink) mkdir /pfs/out/d && echo x > /pfs/out/d/f && ln -s d /pfs/out/dl ;;
  e2-rootlink) ln -s / /pfs/out/root ;;
  f-logs) head -c 1073741824 /dev/zero; cp /pfs/in/* /pfs/out/ ;;
  g-disk) dd if=/dev/zero of=/pfs/out/big bs=1M count=64 2>&1; exit 1 ;;
  *) cp /pfs/in/* /pfs/out/ ;;
esac
"""


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 16 MiB tmpfs where the workers keep their datums (we run as root; skip where we cannot)."""
    scratch = tmp_path / "home" / "scratch"
    scratch.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(scratch)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield scratch
    finally:
        subprocess.run(["umount", "-l", str(scratch)], check=False)


@pytest.mark.asyncio
async def test_unruly_user_code_fails_its_datum_cleanly(
    small_disk: Path, make_cluster, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster()
    marks = tmp_path / "marks"
    marks.mkdir()
    names = [
        "a-hang",
        "b-fork",
        "c-symlink",
        "d-dotdot",
        "e-dirlink",
        "e2-rootlink",
        "f-logs",
        "g-disk",
        "z-ok1",
        "z-ok2",
    ]
    async with cluster.api() as api:
        await api.repos.create_repo("src")
        refs = []
        for name in names:
            key, size = await api.store.put_bytes(f"{name}\n".encode())
            refs.append(FileRef(path=f"/{name}", size=size, hash=key))
        await api.repos.commit_files("src", "master", puts=refs)
    unruly = {
        "pipeline": {"name": "unruly"},
        "input": {"pfs": {"repo": "src", "name": "in", "glob": "/[!a]*"}},
        "transform": {"cmd": ["sh", "-c", UNRULY], "env": {"MARKS": str(marks)}},
        "datum_tries": 1,
        "datum_timeout": "60s",
    }
    create_pipeline(cluster, tmp_path, unruly)
    # The one that hangs, with a short datum_timeout, alongside.
    hangs = {**unruly, "pipeline": {"name": "hangs"}, "datum_timeout": "2s"}
    create_pipeline(
        cluster,
        tmp_path,
        {**hangs, "input": {"pfs": {**unruly["input"]["pfs"], "glob": "/a-hang"}}},
    )
    [job] = await wait_job_done(cluster, "unruly", timeout=90)
    # Five datums failed, each for its own reason; the four others succeeded; the job says so.
    assert job.state == "failure"
    [hung] = await wait_job_done(cluster, "hangs", timeout=90)
    assert hung.state == "failure" and (hung.data_total, hung.data_failed) == (1, 1)
    [hung_result] = _first_of_each(await results_of(cluster, "hangs", hung.id)).values()
    assert "ran longer than datum_timeout (2s)" in hung_result.error
    results = _first_of_each(await results_of(cluster, "unruly", job.id))
    by_name = {r.files[0].path.strip("/"): r for r in results.values()}
    states = {name: (r.state, r.error[:200]) for name, r in sorted(by_name.items())}
    assert (job.data_total, job.data_processed, job.data_failed) == (9, 4, 5), "\n".join(
        f"{k}: {v}" for k, v in states.items()
    )
    expect = {
        "c-symlink": "outside /pfs/out",
        "d-dotdot": "outside /pfs/out",
        "e-dirlink": "links to a directory",
        "e2-rootlink": "outside /pfs/out",
        "g-disk": "No space left on device",
    }
    for name, fragment in expect.items():
        assert by_name[name].state == "failed", (name, by_name[name])
        assert fragment in by_name[name].error, (name, by_name[name].error)
    for name in ("b-fork", "f-logs", "z-ok1", "z-ok2"):
        assert by_name[name].state == "success", (name, by_name[name].error)
    # A gigabyte of output: the datum is kept, its log is capped and says what was dropped.
    async with cluster.api() as api:
        log = await api.store.get_bytes(by_name["f-logs"].logs)
        head = await api.repos.head("unruly", "master")
    assert len(log) <= sandbox.LOG_CAP + 200
    assert b"more bytes of output dropped" in log
    # A failed job makes no output commit: the output repo is untouched.
    assert head is None
    # The child that left its session with setsid went down with its datum.
    pid = int((marks / "fork.pid").read_text())
    try:
        await eventually(
            lambda: dead(pid), timeout=10, what="the child that left its session to die with it"
        )
    finally:
        if not dead(pid):
            os.kill(pid, signal.SIGKILL)
    # The full disk was given back: the next job, on the same small disk, succeeds.
    async with cluster.api() as api:
        key, size = await api.store.put_bytes(b"fine\n")
        await api.repos.commit_files(
            "src",
            "master",
            puts=[FileRef(path="/z-ok3", size=size, hash=key)],
            deletes=[f"/{n}" for n in names[:8]],
        )
    jobs = await wait_job_done(cluster, "unruly", count=2, timeout=90)
    assert jobs[0].state == "success", jobs[0].reason
    assert (jobs[0].data_total, jobs[0].data_failed) == (3, 0)


def _first_of_each(results: list[DatumResult]) -> dict[str, DatumResult]:
    """The first result of each datum, by datum id, as the committer counts them."""
    out: dict[str, DatumResult] = {}
    for result in results:
        out.setdefault(result.datum, result)
    return out


def test_hung_and_forking_user_code_is_killed_with_all_its_children(tmp_path: Path) -> None:
    """The sandbox alone: a process that hangs, with children in its group, in a group of their
    own, and in a session of their own; all are gone when the timeout fires."""
    pids = tmp_path / "pids"
    script = (
        f"sleep 300 & echo $! >> {pids}; "
        f"setsid sleep 300 & echo $! >> {pids}; "
        f"(set -m; sleep 300 & echo $! >> {pids}; wait) & "
        "sleep 600"
    )
    outcome = asyncio.run(
        sandbox.run(
            ["sh", "-c", script],
            stdin=b"",
            env=sandbox.user_environment({}),
            layout=tmp_path,
            mode="env",
            timeout=1.5,
        )
    )
    assert outcome.returncode is None  # killed for its timeout
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 3
    # SIGKILL is sent to each before run() returns; on a loaded machine a process may take a
    # moment to be scheduled and die.
    try:
        wait_until(
            lambda: [p for p in started if not dead(p)],
            until=lambda survivors: not survivors,
            timeout=10,
            what="the killed user processes to die",
        )
    finally:
        for p in started:
            if not dead(p):
                os.kill(p, signal.SIGKILL)
