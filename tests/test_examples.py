"""The examples as a user runs them: each one's `run.sh`, and the README's walk-through word for
word, against one real `datumflow up` for the module.

Every example's user code hard-codes /pfs, as Pachyderm code does, so the module needs what gives
each datum's process a /pfs of its own: Linux mount namespaces, as root.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from datumflow.functions.worker.sandbox import choose_mode
from tests.helpers import REPO_ROOT, Cluster, shared_cluster

EXAMPLES = REPO_ROOT / "examples"
# `datumflow` and `python3` as a user's activated virtualenv gives them: this interpreter's.
BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if choose_mode("auto") != "namespace":
        pytest.skip("the examples hard-code /pfs, which needs Linux mount namespaces (root)")
    # What the examples' READMEs tell a user to start `datumflow up` with: the user code on the
    # PYTHONPATH, the virtualenv (with OpenCV) first on the PATH.
    pythonpath = os.pathsep.join(
        [str(EXAMPLES / "edges"), str(EXAMPLES / "primes")]
        + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    )
    with shared_cluster(
        tmp_path_factory.mktemp("examples"),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=pythonpath,
    ) as cluster:
        yield cluster


def sh(
    cluster: Cluster, script: str, *, cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run shell text as a user would, in `cwd`, with the commands finding the cluster."""
    result = subprocess.run(
        ["sh", "-c", script],
        cwd=cwd,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{script!r} exited {result.returncode}\nstdout:\n{result.stdout}\n"
            f"stderr:\n{result.stderr}\nworker logs:\n{cluster.log('up')}"
        )
    return result


def walkthrough() -> list[str]:
    """The README's "Using it on one machine" commands, comments dropped."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Using it on one machine", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [re.sub(r"\s+#.*$", "", line) for line in block.splitlines() if line.strip()]


def test_the_readme_walkthrough_runs_the_edges_example(shared: Cluster, tmp_path: Path) -> None:
    import cv2

    lines = walkthrough()
    # The set-up lines (virtualenv, PYTHONPATH, up) are what the module's cluster was started
    # with, and `down` is the fixture's: the rest runs word for word from a copy of the repo root.
    assert lines[0].startswith("python3 -m venv .venv && . .venv/bin/activate")
    assert "opencv-python-headless" in lines[0]
    assert lines[1] == "export PYTHONPATH=$PWD/examples/edges"
    assert lines[2] == "datumflow up --detach" and lines[-1] == "datumflow down"
    steps = lines[3:-1]
    (tmp_path / "examples").symlink_to(EXAMPLES)
    sh(shared, "set -e\n" + "\n".join(steps), cwd=tmp_path)

    edges = cv2.imread(str(tmp_path / "house-edges.png"), cv2.IMREAD_UNCHANGED)
    assert edges is not None and edges.shape == (96, 96)
    assert set(edges.flatten().tolist()) == {0, 255}  # Canny's black and white
    montage = cv2.imread(str(tmp_path / "montage.png"))
    images = sorted((EXAMPLES / "edges" / "images").iterdir())
    # A row per image (sorted), the image then its edges, 128 px tiles 4 px apart.
    assert montage.shape == (4 + 132 * len(images), 4 + 132 * 2, 3)
    house = images.index(EXAMPLES / "edges" / "images" / "house.png")
    right = montage[4 + 132 * house : 4 + 132 * house + 128, 136 : 136 + 128]
    assert (
        right
        == cv2.cvtColor(
            cv2.resize(edges, (128, 128), interpolation=cv2.INTER_NEAREST), cv2.COLOR_GRAY2BGR
        )
    ).all()

    # The example's one command runs the same steps, from its own directory.
    script = (EXAMPLES / "edges" / "run.sh").read_text()
    ran = [
        line.replace('"$here/', "examples/edges/").replace('"', "")
        for line in script.splitlines()
        if line.startswith("datumflow ") and not line.startswith(("datumflow up", "datumflow down"))
    ]
    assert ran == [s for s in steps if s.startswith("datumflow ")]


def test_wordcount_on_a_datumflow_of_its_own(tmp_path: Path) -> None:
    """What a user gets with nothing running: run.sh starts a datumflow in a temporary directory,
    and stops and removes it at the end, whatever happened."""
    if choose_mode("auto") != "namespace":
        pytest.skip("the examples hard-code /pfs, which needs Linux mount namespaces (root)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATUMFLOW_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", TMPDIR=str(tmp_path))
    result = subprocess.run(
        [str(EXAMPLES / "wordcount" / "run.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    words = sum(len(f.read_text().split()) for f in (EXAMPLES / "wordcount" / "texts").iterdir())
    assert result.stdout.splitlines()[-1] == str(words)
    [pid] = re.findall(r"datumflow is up \(pid (\d+)\)", result.stdout)
    assert not Path(f"/proc/{pid}").exists(), "run.sh left its datumflow running"
    assert list(tmp_path.iterdir()) == [], "run.sh left files behind"


def factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out + ([n] if n > 1 else [])


def test_primes_loads_its_table_once_per_worker(shared: Cluster, tmp_path: Path) -> None:
    result = sh(shared, str(EXAMPLES / "primes" / "run.sh"), cwd=tmp_path)
    lines = result.stdout.splitlines()
    numbers = [
        int(word)
        for f in sorted((EXAMPLES / "primes" / "numbers").iterdir())
        for word in f.read_text().split()
    ]
    expected = [
        f"{n} is prime" if factors(n) == [n] else f"{n} = {' x '.join(map(str, factors(n)))}"
        for n in numbers
    ]
    assert lines[: len(expected)] == expected
    workers = [json.loads(line) for line in lines[len(expected) :]]
    assert len(workers) == len(list((EXAMPLES / "primes" / "numbers").iterdir()))
    by_pid: dict[int, list[dict]] = {}
    for w in workers:
        by_pid.setdefault(w["pid"], []).append(w)
    assert 1 <= len(by_pid) <= 2  # parallelism_spec: 2
    for pid, ran in by_pid.items():
        # Built once by each worker, before its first datum, and used by every datum it ran.
        assert {w["loads"] for w in ran} == {1}, pid
        assert len({w["loaded_at"] for w in ran}) == 1, pid
        assert sorted(w["datum_in_this_worker"] for w in ran) == list(range(1, len(ran) + 1))
