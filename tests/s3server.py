"""A real S3 endpoint for tests: moto's server over HTTP, plus a fault-injecting proxy.

Its fixtures are every test module's (conftest.py imports them):

- `s3_endpoint`: moto's ThreadedMotoServer on a free port of 127.0.0.1, for the module.
- `moto_process`: the same server in a child process, for tests that measure this process's memory
  (moto keeps objects and request bodies in memory, which would count against us in-process).
- `aws_env`: dummy credentials and no trace of the developer's own AWS configuration.

`FaultProxy` sits between the client and moto and answers chosen requests itself (503 SlowDown, any
error) or cuts a response body short; everything else goes to moto unchanged, so the S3 server the
client talks to stays real.

Run as a script, this module serves moto on a free port and prints `PORT <n>` once it listens.
"""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

DUMMY_KEY = "testing"
DUMMY_SECRET = "testing"


def free_port() -> int:
    """A port nothing listens on (bound then released: connecting to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sync_client(endpoint: str):  # -> botocore S3 client
    """A plain botocore client for arranging and inspecting buckets around the code under test."""
    import botocore.session
    from botocore.config import Config

    return botocore.session.get_session().create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id=DUMMY_KEY,
        aws_secret_access_key=DUMMY_SECRET,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def make_bucket(endpoint: str, *, versioned: bool = False) -> str:
    name = f"df-{uuid.uuid4().hex[:16]}"
    client = sync_client(endpoint)
    client.create_bucket(Bucket=name)
    if versioned:
        client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def set_moto_auth(endpoint: str, *, enabled: bool) -> None:
    """Make moto check credentials (it accepts any by default) or stop checking them."""
    import urllib.request

    body = b"0" if enabled else b"inf"
    # Not form-encoded (urllib's default), or the server parses the body away as a form.
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=body,
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def moto_process() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve())],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the server listens, or EOF if it died
        if not line.startswith("PORT "):
            pytest.fail(f"moto server process did not start (said {line!r})")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


# -- bucket notifications, as MinIO and AWS S3 send them -----------------------------------------

_sequence = itertools.count(1)


def next_sequencer() -> str:
    """Increasing, like the sequencers S3 and MinIO put in their events (hex, compared padded)."""
    return f"{time.time_ns() + next(_sequence):016X}"


def s3_record(
    event: str,
    bucket: str,
    key: str,
    *,
    etag: str = "",
    size: int | None = None,
    version_id: str = "",
    sequencer: str = "",
) -> dict[str, Any]:
    """One record, `event` as AWS names it (`ObjectCreated:Put`, `ObjectRemoved:Delete`)."""
    obj: dict[str, Any] = {"key": quote_plus(key, safe="/"), "sequencer": sequencer}
    if size is not None:
        obj["size"] = size
    if etag:
        obj["eTag"] = etag.strip('"')
    if version_id:
        obj["versionId"] = version_id
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2026-01-01T00:00:00.000Z",
        "eventName": event,
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "datumflow",
            "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
            "object": obj,
        },
    }


def aws_notification(*records: dict[str, Any]) -> bytes:
    """AWS S3's shape: `Records` only."""
    return json.dumps({"Records": list(records)}).encode()


def minio_notification(record: dict[str, Any]) -> bytes:
    """MinIO's shape: the EventName/Key envelope around one record, `s3:` before the name; no size
    nor eTag on removals."""
    record = json.loads(json.dumps(record))
    record["eventName"] = "s3:" + record["eventName"]
    record["eventSource"] = "minio:s3"
    if record["eventName"].startswith("s3:ObjectRemoved:"):
        record["s3"]["object"].pop("size", None)
        record["s3"]["object"].pop("eTag", None)
    bucket = record["s3"]["bucket"]["name"]
    key = record["s3"]["object"]["key"]
    envelope = {"EventName": record["eventName"], "Key": f"{bucket}/{key}", "Records": [record]}
    return json.dumps(envelope).encode()


def put_and_describe(
    client: Any, bucket: str, key: str, body: bytes, *, event: str = "ObjectCreated:Put"
) -> dict[str, Any]:
    """Write an object, then the notification record S3 would send for it."""
    put = client.put_object(Bucket=bucket, Key=key, Body=body)
    return s3_record(
        event,
        bucket,
        key,
        etag=put["ETag"],
        size=len(body),
        version_id=put.get("VersionId", ""),
        sequencer=next_sequencer(),
    )


# Headers that belong to one HTTP hop, not to the request or response being relayed.
_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection"}
)


@dataclass
class _Fault:
    remaining: int
    status: int
    code: str
    match: Callable[[web.Request], bool]


@dataclass
class Seen:
    method: str
    path: str
    range: str
    status: int = 0


@dataclass
class FaultProxy:
    """An HTTP proxy in front of an S3 endpoint that injects failures on demand."""

    upstream: str
    seen: list[Seen] = field(default_factory=list)
    injected: int = 0
    _faults: list[_Fault] = field(default_factory=list)
    _truncate: list[tuple[int, int]] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None
    endpoint: str = ""

    def fail(
        self,
        count: int,
        *,
        status: int = 503,
        code: str = "SlowDown",
        match: Callable[[web.Request], bool] = lambda request: True,
    ) -> None:
        """Answer the next `count` requests that `match` with an S3 error instead of relaying them."""
        self._faults.append(_Fault(count, status, code, match))

    def truncate_gets(self, count: int, *, after: int) -> None:
        """Cut the body of the next `count` object GETs after `after` bytes, then drop the line."""
        self._truncate.append((count, after))

    async def start(self) -> str:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.endpoint = f"http://127.0.0.1:{port}"
        return self.endpoint

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = Seen(request.method, request.raw_path, request.headers.get("Range", ""))
        self.seen.append(seen)
        for fault in self._faults:
            if fault.remaining and fault.match(request):
                fault.remaining -= 1
                self.injected += 1
                seen.status = fault.status
                await request.read()  # take the whole request, as a real server would
                body = (
                    '<?xml version="1.0" encoding="UTF-8"?>\n'
                    f"<Error><Code>{fault.code}</Code><Message>injected by FaultProxy</Message>"
                    "<RequestId>fault</RequestId></Error>"
                )
                return web.Response(status=fault.status, text=body, content_type="application/xml")
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        url = URL(self.upstream + request.raw_path, encoded=True)
        data = request.content if request.body_exists else None
        async with self._session.request(
            request.method, url, headers=headers, data=data, allow_redirects=False
        ) as upstream:
            seen.status = upstream.status
            response = web.StreamResponse(status=upstream.status)
            for name, value in upstream.headers.items():
                if name.lower() not in _HOP_HEADERS:
                    response.headers.add(name, value)
            await response.prepare(request)
            if request.method == "HEAD":
                return response
            cut = -1
            if request.method == "GET" and upstream.status in (200, 206) and self._truncate:
                count, after = self._truncate[0]
                cut = after
                self._truncate[0] = (count - 1, after)
                if count == 1:
                    self._truncate.pop(0)
            sent = 0
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                if 0 <= cut < sent + len(chunk):
                    await response.write(chunk[: cut - sent])
                    # Drop the connection mid-body: the client sees a short read.
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await response.write(chunk)
                sent += len(chunk)
            await response.write_eof()
            return response


def _serve_forever() -> None:
    import threading

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(f"PORT {server.get_host_and_port()[1]}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    _serve_forever()
