"""The console's JSON API and its token rules, on a real `datumflow up` (its console on) that ran
a job with one failing datum and a job that succeeded.

The API is served in this process by aiohttp's test server from the console's own application,
reading the cluster's broker and store; the console `up` started and a `datumflow console` bound
beyond loopback are reached over real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from datumflow.console.samples import Sampler
from datumflow.console.server import make_app
from datumflow.console.views import Views
from datumflow.runtime.status import CONSOLE_FILE, read_console_url, read_status
from tests.helpers import (
    Cluster,
    create_pipeline,
    eventually,
    put_files,
    shared_cluster,
    wait_job_done,
    wait_until,
)

TOKEN = "s3cret-console-token"
LETTERS = {"/a.txt": b"a", "/b.txt": b"b", "/c.txt": b"c"}
SHOUT = (
    'for f in /pfs/letters/*; do n=$(basename "$f"); echo "shouting $n";'
    ' if [ "$n" = b.txt ]; then echo "cannot shout $n" >&2; exit 3; fi;'
    ' tr a-z A-Z < "$f" > "/pfs/out/$n"; done'
)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("console-api")
    with shared_cluster(root, DATUMFLOW_CONSOLE_ADDRESS="127.0.0.1:0") as cluster:
        asyncio.run(_jobs(cluster, root))
        yield cluster


async def _jobs(cluster: Cluster, root: Path) -> None:
    await put_files(cluster, "letters", LETTERS)
    for name, cmd in [("shout", SHOUT), ("copy", "cp -r /pfs/letters/. /pfs/out/")]:
        spec = {
            "pipeline": {"name": name},
            "input": {"pfs": {"repo": "letters", "glob": "/*"}},
            "transform": {"cmd": ["sh", "-c", cmd]},
            "datum_tries": 1,
        }
        create_pipeline(cluster, root, spec)
    for name in ("shout", "copy"):
        await wait_job_done(cluster, name)


@pytest_asyncio.fixture
async def client(shared: Cluster) -> AsyncIterator[TestClient[Any, Any]]:
    async with shared.api() as api:
        views = Views(broker=api.broker, store=api.store)
        # The jobs are done; the local scaler's status, which the sampler reads, follows within
        # its own period: one sample once it has seen no lag left.
        await eventually(
            lambda: all(
                (read_status(shared.home).get(p) or {}).get("lag") == 0 for p in ("shout", "copy")
            ),
            timeout=30,
            what="up's scaler to see no lag left",
        )
        sampler = Sampler(broker=api.broker, home=shared.home)
        await sampler.sample()
        app = make_app(views=views, sampler=sampler, token=TOKEN, loopback=True)
        try:
            async with TestClient(TestServer(app)) as c:
                yield c
        finally:
            await views.close()


async def get_json(client: TestClient[Any, Any], path: str, status: int = 200) -> Any:
    response = await client.get(path)
    assert response.status == status, await response.text()
    return await response.json()


@pytest.mark.asyncio
async def test_dag_jobs_datums_and_log(client: TestClient[Any, Any]) -> None:
    dag = await get_json(client, "/api/dag")
    kinds = {n["id"]: n["kind"] for n in dag["nodes"]}
    assert kinds == {"letters": "repo", "shout": "pipeline", "copy": "pipeline"}
    assert {(e["from"], e["to"]) for e in dag["edges"]} == {
        ("letters", "shout"),
        ("letters", "copy"),
    }
    shout_node = next(n for n in dag["nodes"] if n["id"] == "shout")
    assert shout_node["last_job_state"] == "failure"
    assert shout_node["lag"] == 0  # sampled: nothing left for its workers

    [job] = (await get_json(client, "/api/jobs?pipeline=shout"))["jobs"]
    assert (job["state"], job["total"], job["processed"], job["failed"], job["queued"]) == (
        "failure",
        3,
        2,
        1,
        0,
    )
    assert job["progress"] == 1.0 and job["duration"] > 0
    every = (await get_json(client, "/api/jobs"))["jobs"]
    assert {j["pipeline"] for j in every} == {"shout", "copy"}

    detail = await get_json(client, f"/api/jobs/shout/{job['id']}")
    failed, *others = detail["datums"]
    assert failed["state"] == "failed" and failed["files"] == ["/b.txt"]
    assert "3" in failed["error"] and failed["attempts"] == 1 and failed["has_log"]
    assert [d["state"] for d in others] == ["success", "success"]
    assert all(d["process_time"] > 0 for d in detail["datums"])

    log = await client.get(f"/api/jobs/shout/{job['id']}/datums/{failed['id']}/log")
    assert log.status == 200
    text = await log.text()
    assert "shouting b.txt" in text and "cannot shout b.txt" in text

    missing = await get_json(client, "/api/jobs/shout/nosuchjob", status=404)
    assert "does not exist" in missing["error"]
    await get_json(client, "/api/jobs?pipeline=nosuch", status=404)


@pytest.mark.asyncio
async def test_commits_files_and_provenance(client: TestClient[Any, Any]) -> None:
    [source] = (await get_json(client, "/api/repos/letters/commits"))["commits"]
    assert (source["origin"], source["files"]) == ("user", 3)
    out = await get_json(client, "/api/repos/copy/commits")
    assert out["pipeline"] == "copy"
    [made] = out["commits"]
    assert made["origin"] == "pipeline" and made["job"]
    assert made["provenance"] == [{"repo": "letters", "commit": source["id"], "branch": "master"}]
    files = await get_json(client, f"/api/repos/copy/commits/{made['id']}/files")
    assert [f["path"] for f in files["files"]] == sorted(LETTERS)
    # The failed job made no commit.
    assert (await get_json(client, "/api/repos/shout/commits"))["commits"] == []
    await get_json(client, "/api/repos/nosuch/commits", status=404)


@pytest.mark.asyncio
async def test_workers_series(client: TestClient[Any, Any]) -> None:
    workers = await get_json(client, "/api/workers")
    assert set(workers["series"]) == {"shout", "copy"}
    [sample] = workers["series"]["shout"]
    # Beside a running `up`, the numbers are its local scaler's own.
    assert sample["source"] == "local" and sample["lag"] == 0
    assert sample["running"] is not None and sample["desired"] is not None
    one = await get_json(client, "/api/workers?pipeline=copy")
    assert list(one["series"]) == ["copy"]


@pytest.mark.asyncio
async def test_rerun_needs_the_token_even_on_loopback(client: TestClient[Any, Any]) -> None:
    page = await client.get("/")
    assert page.status == 200 and "console.js" in await page.text()
    assert "script-src" not in page.headers["Content-Security-Policy"]  # default-src 'self'
    assert page.headers["Referrer-Policy"] == "no-referrer"  # its URL may carry the token
    path = "/api/jobs/shout/nosuchjob/rerun"
    refused = await client.post(path)
    assert refused.status == 401
    assert "token" in (await refused.json())["error"]
    # A cookie is not enough to act: only a header the page itself sends.
    assert (await client.post(path, cookies={"datumflow_token": TOKEN})).status == 401
    assert (await client.post(path, headers={"X-Datumflow-Token": "wrong"})).status == 401
    allowed = await client.post(path, headers={"X-Datumflow-Token": TOKEN})
    assert allowed.status == 404  # let through: the job does not exist
    assert "does not exist" in (await allowed.json())["error"]


@pytest.mark.asyncio
async def test_beyond_loopback_everything_needs_the_token(shared: Cluster) -> None:
    async with shared.api() as api:
        views = Views(broker=api.broker, store=api.store)
        sampler = Sampler(broker=api.broker, home=None)
        app = make_app(views=views, sampler=sampler, token=TOKEN, loopback=False)
        async with TestClient(TestServer(app)) as c:
            for path in ["/", "/api/dag", "/api/jobs", "/static/console.js", "/api/workers"]:
                response = await c.get(path)
                assert response.status == 401, path
            assert (await c.get("/api/dag", headers={"X-Datumflow-Token": TOKEN})).status == 200
            assert (
                await c.get("/api/dag", headers={"Authorization": f"Bearer {TOKEN}"})
            ).status == 200
            # The URL `up` prints carries the token; the page then sets it as a cookie.
            page = await c.get(f"/?token={TOKEN}")
            assert page.status == 200
            assert page.cookies["datumflow_token"].value == TOKEN
            assert (await c.get("/api/dag")).status == 200  # the client kept the cookie
            assert (
                await c.get("/api/dag?token=wrong", cookies={"datumflow_token": "x"})
            ).status == 401


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_up_serves_the_console_and_prints_its_url(shared: Cluster) -> None:
    wait_until(lambda: read_console_url(shared.home), timeout=30, what="up's console URL")
    url = read_console_url(shared.home)
    assert url.startswith("http://127.0.0.1:") and "?token=" in url
    assert os.stat(shared.home / CONSOLE_FILE).st_mode & 0o077 == 0  # it carries the token
    wait_until(lambda: url in shared.log("up"), timeout=10, what="up to print the URL")
    # The console's own log (a plain file under logs/) names where it listens, not the token.
    wait_until(lambda: "datumflow console:" in shared.log("console"), timeout=10, what="its log")
    assert url.split("?token=")[1] not in shared.log("console")
    base = url.split("?")[0]
    status, body = _get(base + "api/dag")  # loopback: no token needed to read
    assert status == 200 and b"shout" in body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_console_command_beyond_loopback(shared: Cluster) -> None:
    port = free_port()
    env = {**shared.env, "DATUMFLOW_CONSOLE_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [*shared.prefix, "console", "--address", f"0.0.0.0:{port}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = ""
        for line in proc.stdout:  # logging goes to the same pipe; the URL has its own line
            if line.startswith("datumflow console:"):
                break
        assert f"http://127.0.0.1:{port}/?token={TOKEN}" in line, line
        assert "every client with the token" in line
        base = f"http://127.0.0.1:{port}"
        status, body = _get(base + "/api/dag")
        assert status == 401 and b"token" in body
        status, body = _get(base + "/api/dag", {"X-Datumflow-Token": TOKEN})
        assert status == 200
        assert {n["id"] for n in json.loads(body)["nodes"]} == {"letters", "shout", "copy"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.asyncio
async def test_rerun_button_reruns_the_failed_datums(
    shared: Cluster, client: TestClient[Any, Any]
) -> None:
    """Last in the module: it adds a job to `shout`."""
    headers = {"X-Datumflow-Token": TOKEN}
    [old] = (await get_json(client, "/api/jobs?pipeline=shout"))["jobs"]
    [copied] = (await get_json(client, "/api/jobs?pipeline=copy"))["jobs"]
    nothing = await client.post(f"/api/jobs/copy/{copied['id']}/rerun", headers=headers)
    assert nothing.status == 200
    assert (await nothing.json())["nothing"] is True  # it succeeded: no failed datum

    response = await client.post(f"/api/jobs/shout/{old['id']}/rerun", headers=headers)
    assert response.status == 200, await response.text()
    done = await response.json()
    assert (done["job"], done["rerun"], done["carried"], done["nothing"]) == (
        old["id"],
        1,
        2,
        False,
    )
    new = (await wait_job_done(shared, "shout", count=2))[0]
    assert new.id == done["new_job"]
    # b.txt fails again (the code still cannot shout it); the others were carried over.
    assert (new.data_total, new.data_skipped, new.data_failed) == (3, 2, 1)
    # The old job is no longer the pipeline's newest: refused, with why.
    again = await client.post(f"/api/jobs/shout/{old['id']}/rerun", headers=headers)
    assert again.status == 400 and "newest" in (await again.json())["error"]
