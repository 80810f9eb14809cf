"""S3Store against a real S3 endpoint over HTTP (moto's server), with faults from a proxy."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from datumflow.broker.messages import ObjectSource
from datumflow.errors import NotFound, PermanentError, StorageError, TemporaryError
from datumflow.storage import open_store
from datumflow.storage.s3 import MIN_PART_SIZE, S3Store, parse_s3_url
from tests.s3server import FaultProxy, free_port, make_bucket, set_moto_auth, sync_client

MiB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_random(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    return make_bucket(s3_endpoint)


@pytest_asyncio.fixture
async def store(aws_env: None, s3_endpoint: str, bucket: str) -> AsyncIterator[S3Store]:
    s = await S3Store.open(f"s3://{bucket}/pre", endpoint=s3_endpoint, part_size=MIN_PART_SIZE)
    yield s
    await s.close()


@pytest_asyncio.fixture
async def proxy(s3_endpoint: str) -> AsyncIterator[FaultProxy]:
    p = FaultProxy(s3_endpoint)
    await p.start()
    yield p
    await p.stop()


@pytest_asyncio.fixture
async def proxied(aws_env: None, proxy: FaultProxy, bucket: str) -> AsyncIterator[S3Store]:
    """A store that reaches moto through the fault proxy."""
    s = await S3Store.open(f"s3://{bucket}/pre", endpoint=proxy.endpoint, part_size=MIN_PART_SIZE)
    proxy.seen.clear()
    yield s
    await s.close()


# -- the ObjectStore operations ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_put_bytes_and_read_back(store: S3Store, s3_endpoint: str, bucket: str) -> None:
    data = b"manifest contents\n" * 1000
    key, size = await store.put_bytes(data)
    assert (key, size) == (sha(data), len(data))
    assert await store.exists(key)
    assert await store.get_bytes(key) == data
    assert b"".join([chunk async for chunk in store.read(key)]) == data
    # Spread over hash prefixes under the store's prefix, like the file backend's layout.
    listed = sync_client(s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in listed] == [f"pre/{key[:2]}/{key}"]


@pytest.mark.asyncio
async def test_put_file_and_get_file(store: S3Store, tmp_path: Path) -> None:
    data = write_random(tmp_path / "in.bin", 3 * MiB + 7)
    key, size = await store.put_file(tmp_path / "in.bin")
    assert (key, size) == (sha(data), len(data))
    out = tmp_path / "out" / "copy.bin"
    out.parent.mkdir()
    assert await store.get_file(key, out) == len(data)
    assert out.read_bytes() == data
    assert os.listdir(out.parent) == ["copy.bin"]  # no temporary file left behind


@pytest.mark.asyncio
async def test_empty_file(store: S3Store, tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    key, size = await store.put_file(tmp_path / "empty")
    assert (key, size) == (sha(b""), 0)
    assert await store.get_file(key, tmp_path / "back") == 0
    assert (tmp_path / "back").read_bytes() == b""


@pytest.mark.asyncio
async def test_exists_and_delete(store: S3Store) -> None:
    key, _ = await store.put_bytes(b"short-lived")
    await store.delete(key)
    assert not await store.exists(key)
    await store.delete(key)  # deleting what is gone is fine


@pytest.mark.asyncio
async def test_missing_object(store: S3Store, tmp_path: Path) -> None:
    key = sha(b"never stored")
    assert not await store.exists(key)
    with pytest.raises(NotFound, match=f"object {key} is not in the store at s3://"):
        await store.get_bytes(key)
    with pytest.raises(NotFound, match="is not in the store"):
        await store.get_file(key, tmp_path / "x")
    assert os.listdir(tmp_path) == []
    with pytest.raises(NotFound):
        async for _ in store.read(key):
            pass


@pytest.mark.asyncio
async def test_key_that_is_not_a_hash(store: S3Store) -> None:
    with pytest.raises(NotFound, match="not a content hash"):
        await store.get_bytes("../../etc")


@pytest.mark.asyncio
async def test_identical_content_is_uploaded_once(
    proxied: S3Store, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = write_random(tmp_path / "a", 200_000)
    (tmp_path / "b").write_bytes(data)
    first = await proxied.put_file(tmp_path / "a")
    second = await proxied.put_file(tmp_path / "b")
    third = await proxied.put_bytes(data)
    assert first == second == third == (sha(data), len(data))
    assert [s.method for s in proxy.seen] == ["HEAD", "PUT", "HEAD", "HEAD"]


@pytest.mark.asyncio
async def test_damaged_object_is_detected_and_replaced(
    store: S3Store, s3_endpoint: str, bucket: str
) -> None:
    data = b"the real content"
    key, _ = await store.put_bytes(data)
    client = sync_client(s3_endpoint)
    client.put_object(Bucket=bucket, Key=store.object_key(key), Body=b"the fake content")
    with pytest.raises(PermanentError, match="is damaged: its content hashes to"):
        await store.get_bytes(key)
    # A stored copy of the wrong size is not taken for the content: the next upload replaces it.
    client.put_object(Bucket=bucket, Key=store.object_key(key), Body=b"short")
    await store.put_bytes(data)
    assert await store.get_bytes(key) == data


@pytest.mark.asyncio
async def test_open_store_picks_s3(aws_env: None, s3_endpoint: str, bucket: str) -> None:
    s = await open_store(f"s3://{bucket}", endpoint=s3_endpoint, region="eu-west-1")
    assert isinstance(s, S3Store)
    async with s:
        key, _ = await s.put_bytes(b"x")
        assert s.object_key(key) == f"{key[:2]}/{key}"
        assert s.url == f"s3://{bucket}"


@pytest.mark.asyncio
async def test_open_rejects_bad_options(aws_env: None, bucket: str) -> None:
    with pytest.raises(ValueError, match="use s3://bucket"):
        await S3Store.open("s3:///prefix")
    with pytest.raises(ValueError, match="minimum"):
        await S3Store.open(f"s3://{bucket}", part_size=MiB)


# -- multipart ---------------------------------------------------------------------------------


def is_part(request) -> bool:  # aiohttp.web.Request
    return request.method == "PUT" and "partNumber=" in request.query_string


@pytest.mark.asyncio
async def test_multipart_upload(
    proxied: S3Store, proxy: FaultProxy, s3_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    data = write_random(tmp_path / "big", 2 * MIN_PART_SIZE + 12345)
    key, size = await proxied.put_file(tmp_path / "big")
    assert (key, size) == (sha(data), len(data))
    parts = [s for s in proxy.seen if s.method == "PUT" and "partNumber=" in s.path]
    assert len(parts) == 3
    head = sync_client(s3_endpoint).head_object(Bucket=bucket, Key=proxied.object_key(key))
    assert head["ETag"].strip('"').endswith("-3")
    assert await proxied.get_file(key, tmp_path / "back") == len(data)
    assert (tmp_path / "back").read_bytes() == data


@pytest.mark.asyncio
async def test_failed_multipart_upload_is_aborted(
    proxied: S3Store, proxy: FaultProxy, s3_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    write_random(tmp_path / "big", 2 * MIN_PART_SIZE + 1)
    proxy.fail(1, status=400, code="InvalidArgument", match=is_part)
    with pytest.raises(PermanentError, match="InvalidArgument"):
        await proxied.put_file(tmp_path / "big")
    client = sync_client(s3_endpoint)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert any(s.method == "DELETE" and "uploadId=" in s.path for s in proxy.seen)
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)


# -- retries -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_slowdown_is_retried(proxied: S3Store, proxy: FaultProxy) -> None:
    proxy.fail(2, match=lambda request: request.method == "PUT")
    key, _ = await proxied.put_bytes(b"throttled at first")
    assert proxy.injected == 2
    assert [s.status for s in proxy.seen if s.method == "PUT"] == [503, 503, 200]
    assert await proxied.get_bytes(key) == b"throttled at first"


@pytest.mark.asyncio
async def test_slowdown_that_persists_is_a_temporary_error(
    aws_env: None, proxy: FaultProxy, bucket: str
) -> None:
    s = await S3Store.open(f"s3://{bucket}", endpoint=proxy.endpoint, max_attempts=2)
    async with s:
        proxy.fail(2)
        with pytest.raises(StorageError, match="is throttling requests") as info:
            await s.get_bytes(sha(b"anything"))
        assert isinstance(info.value, TemporaryError)
        assert proxy.injected == 2


@pytest.mark.asyncio
async def test_broken_download_resumes_where_it_stopped(
    proxied: S3Store, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = write_random(tmp_path / "f", 3 * MiB)
    key, _ = await proxied.put_file(tmp_path / "f")
    proxy.truncate_gets(2, after=MiB + 17)
    proxy.seen.clear()
    assert await proxied.get_file(key, tmp_path / "back") == len(data)
    assert (tmp_path / "back").read_bytes() == data
    # Each retry asks for the rest from where the bytes the client had taken stopped (the proxy
    # sent more, but a connection error drops what the client had not read yet).
    ranges = [s.range for s in proxy.seen if s.method == "GET"]
    assert len(ranges) == 3
    assert ranges[0] == ""
    first, second = (int(r.removeprefix("bytes=").removesuffix("-")) for r in ranges[1:])
    assert 0 < first <= MiB + 17
    assert first < second <= first + MiB + 17


# -- errors that say what to do ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_missing_bucket(aws_env: None, s3_endpoint: str) -> None:
    with pytest.raises(NotFound, match=r"bucket 'no-such-bucket' does not exist at http://") as e:
        await S3Store.open("s3://no-such-bucket/x", endpoint=s3_endpoint)
    assert "aws s3 mb s3://no-such-bucket" in str(e.value)


@pytest.mark.asyncio
async def test_unreachable_endpoint(aws_env: None) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint {endpoint}"):
        await S3Store.open("s3://bucket", endpoint=endpoint, max_attempts=1)
    s = await S3Store.open("s3://bucket", endpoint=endpoint, max_attempts=1, check=False)
    async with s:
        with pytest.raises(StorageError, match="check the endpoint setting"):
            await s.put_bytes(b"x")


@pytest.mark.asyncio
async def test_bad_credentials(aws_env: None, s3_endpoint: str, bucket: str) -> None:
    set_moto_auth(s3_endpoint, enabled=True)
    try:
        with pytest.raises(PermanentError, match="rejected the credentials") as e:
            await S3Store.open(f"s3://{bucket}", endpoint=s3_endpoint)
    finally:
        set_moto_auth(s3_endpoint, enabled=False)
    assert "InvalidAccessKeyId" in str(e.value)
    assert not isinstance(e.value, TemporaryError)


@pytest.mark.asyncio
async def test_no_credentials(
    aws_env: None, monkeypatch: pytest.MonkeyPatch, s3_endpoint: str, bucket: str
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(PermanentError, match=r"no usable S3 credentials .* AWS_ACCESS_KEY_ID"):
        await S3Store.open(f"s3://{bucket}", endpoint=s3_endpoint)
    # Explicit options work without any environment.
    s = await S3Store.open(
        f"s3://{bucket}", endpoint=s3_endpoint, access_key="testing", secret_key="testing"
    )
    await s.close()


@pytest.mark.asyncio
async def test_credential_options(aws_env: None, s3_endpoint: str, bucket: str) -> None:
    with pytest.raises(PermanentError, match=r"profile \(nowhere\) could not be found"):
        await S3Store.open(f"s3://{bucket}", endpoint=s3_endpoint, profile="nowhere")
    with pytest.raises(ValueError, match="both access_key and secret_key"):
        await S3Store.open(f"s3://{bucket}", endpoint=s3_endpoint, access_key="AKIA")


# -- objects referenced in place ---------------------------------------------------------------


@pytest_asyncio.fixture
async def source_bucket(s3_endpoint: str) -> str:
    return make_bucket(s3_endpoint, versioned=True)


@pytest.mark.asyncio
async def test_get_source_checks_the_etag(
    store: S3Store, s3_endpoint: str, source_bucket: str, tmp_path: Path
) -> None:
    client = sync_client(s3_endpoint)
    key = "incoming/my photo+1.jpg"
    put = client.put_object(Bucket=source_bucket, Key=key, Body=b"version one")
    url = f"s3://{source_bucket}/{key}"

    for etag in (put["ETag"], put["ETag"].strip('"'), ""):
        dest = tmp_path / "photo.jpg"
        assert await store.get_source(ObjectSource(url=url, etag=etag), dest) == 11
        assert dest.read_bytes() == b"version one"

    client.put_object(Bucket=source_bucket, Key=key, Body=b"version two")
    (tmp_path / "photo.jpg").unlink()
    with pytest.raises(PermanentError, match="changed since it was committed") as e:
        await store.get_source(ObjectSource(url=url, etag=put["ETag"]), tmp_path / "photo.jpg")
    assert url in str(e.value)
    assert os.listdir(tmp_path) == []

    client.delete_object(Bucket=source_bucket, Key=key)
    with pytest.raises(NotFound, match="vanished since it was committed"):
        await store.get_source(ObjectSource(url=url, etag=put["ETag"]), tmp_path / "photo.jpg")


@pytest.mark.asyncio
async def test_get_source_by_version(
    store: S3Store, s3_endpoint: str, source_bucket: str, tmp_path: Path
) -> None:
    client = sync_client(s3_endpoint)
    key = "data/a.csv"
    first = client.put_object(Bucket=source_bucket, Key=key, Body=b"a,b\n1,2\n")
    client.put_object(Bucket=source_bucket, Key=key, Body=b"a,b\n3,4\n")
    source = ObjectSource(
        url=f"s3://{source_bucket}/{key}", etag=first["ETag"], version_id=first["VersionId"]
    )
    # The committed version is still there, although the key has moved on.
    assert await store.get_source(source, tmp_path / "a.csv") == 8
    assert (tmp_path / "a.csv").read_bytes() == b"a,b\n1,2\n"

    client.delete_object(Bucket=source_bucket, Key=key, VersionId=first["VersionId"])
    with pytest.raises(NotFound, match=rf"\(version {first['VersionId']}\) vanished"):
        await store.get_source(source, tmp_path / "gone.csv")


@pytest.mark.asyncio
async def test_get_source_in_a_missing_bucket(store: S3Store, tmp_path: Path) -> None:
    source = ObjectSource(url="s3://no-such-source-bucket/x", etag="abc")
    with pytest.raises(NotFound, match="bucket 'no-such-source-bucket' does not exist"):
        await store.get_source(source, tmp_path / "x")
    with pytest.raises(PermanentError, match="not an S3 URL"):
        await store.get_source(ObjectSource(url="file:///etc/passwd"), tmp_path / "x")


@pytest.mark.asyncio
async def test_sources_with_url_characters_in_their_keys(
    store: S3Store, s3_endpoint: str, source_bucket: str, tmp_path: Path
) -> None:
    """An S3 key is taken verbatim from s3://bucket/key: `?`, `#`, `%` and `+` are part of it."""
    client = sync_client(s3_endpoint)
    key = "odd/what? #1 100%+more.txt"
    put = client.put_object(Bucket=source_bucket, Key=key, Body=b"odd bytes")
    url = f"s3://{source_bucket}/{key}"
    assert parse_s3_url(url) == (source_bucket, key)
    source = ObjectSource(url=url, etag=put["ETag"])
    assert await store.get_source(source, tmp_path / "odd") == 9
    assert b"".join([c async for c in store.read_source(source)]) == b"odd bytes"

    info = await store.head_source(url)
    assert info is not None
    assert (info.etag, info.size) == (put["ETag"].strip('"'), 9)
    assert info.version_id == put["VersionId"]
    assert await store.head_source(f"s3://{source_bucket}/odd/absent") is None

    client.put_object(Bucket=source_bucket, Key=key, Body=b"other bytes")
    with pytest.raises(PermanentError, match="changed since it was committed"):
        [c async for c in store.read_source(source)]


@pytest.mark.asyncio
async def test_check_source(store: S3Store, source_bucket: str) -> None:
    await store.check_source(f"s3://{source_bucket}/some/prefix")
    await store.check_source(f"s3://{source_bucket}")
    with pytest.raises(NotFound, match="bucket 'no-such-feed' does not exist"):
        await store.check_source("s3://no-such-feed/x")


# -- memory ------------------------------------------------------------------------------------


def write_random_blocks(path: Path, size: int) -> str:
    """Write `size` random bytes a MiB at a time; return their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            block = os.urandom(MiB)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            digest.update(block)
    return digest.hexdigest()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def _reset_peak_rss() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS; Linux only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmHWM") - _status_kib("VmRSS") < 1024
    except (OSError, LookupError):
        return False


@pytest.mark.asyncio
async def test_large_file_streams_both_ways(
    aws_env: None, moto_process: str, tmp_path: Path
) -> None:
    """A 64 MiB file goes up in 16 MiB parts and comes back without this process growing by a part.

    moto runs in another process here: in this one its copies of the object would be measured too.
    """
    size = 64 * MiB
    expected = write_random_blocks(tmp_path / "big", size)
    bucket = make_bucket(moto_process)
    s = await S3Store.open(f"s3://{bucket}", endpoint=moto_process)
    async with s:
        await s.put_bytes(b"warm up")  # load botocore's models and open connections first
        await s.get_bytes(sha(b"warm up"))

        use_rss = _reset_peak_rss()
        before = _status_kib("VmRSS") * 1024 if use_rss else 0
        if not use_rss:
            tracemalloc.start()
        try:
            key, stored = await s.put_file(tmp_path / "big")
            got = await s.get_file(key, tmp_path / "back")
            if use_rss:
                growth = _status_kib("VmHWM") * 1024 - before
            else:
                growth = tracemalloc.get_traced_memory()[1]
        finally:
            if not use_rss:
                tracemalloc.stop()
        assert (key, stored, got) == (expected, size, size)
        # Below one 16 MiB part: neither the file nor a part was ever held whole. What remains
        # (about 3 to 11 MiB here) is 1 MiB read buffers of the concurrent parts and the thread
        # pool's malloc arenas.
        assert growth < s.part_size, f"peak memory grew by {growth / MiB:.1f} MiB"
        head = sync_client(moto_process).head_object(Bucket=bucket, Key=s.object_key(key))
        assert head["ETag"].strip('"').endswith("-4")
    assert hash_file(tmp_path / "back") == key
