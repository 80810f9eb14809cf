"""Throughput of a big file through `put file` and a `cat` pipeline on the S3 backend.

    .venv/bin/python bench/s3_throughput.py [--size-mib 1024] [--keep]

Starts moto's S3 server in its own process, `datumflow up --detach --storage s3://bench/df` in a
temporary state directory, then:

1. `datumflow put file` of one random file of --size-mib (hash pass + multipart upload);
2. pipeline `cat` (cat /pfs/big/big.bin > /pfs/out/big.bin): the output has the input's content,
   so the content-addressed store already holds it and the upload is a HEAD;
3. pipeline `headed` (one line, then cat): new content, so the whole output is uploaded.

Prints wall time and MiB/s of each, the worker's download/process/upload split, and the peak RSS
(VmHWM) of the `put file` process and of each pipeline's worker. Not a test: numbers depend on the
machine, and moto keeps every object in its own memory (about 3x the file size at peak).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datumflow.cli.context import open_api  # noqa: E402
from datumflow.runtime.embedded import read_instance  # noqa: E402
from datumflow.settings import Settings  # noqa: E402

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc, endpoint
        time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def write_random(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            # Vary each block cheaply so no two parts are equal.
            f.write(i.to_bytes(8, "little") + block[8:])


def baseline(client: object, path: Path, size: int) -> tuple[float, float]:
    """MiB/s of a plain botocore multipart upload (16 MiB parts, one at a time, no checksums of
    ours) and of a plain GET of it, against the same server: what moto itself allows."""
    part = 16 * MiB
    start = time.monotonic()
    upload = client.create_multipart_upload(Bucket="bench", Key="baseline")  # type: ignore[attr-defined]
    parts = []
    with open(path, "rb") as f:
        number = 1
        while chunk := f.read(part):
            answer = client.upload_part(  # type: ignore[attr-defined]
                Bucket="bench",
                Key="baseline",
                UploadId=upload["UploadId"],
                PartNumber=number,
                Body=chunk,
            )
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            number += 1
    client.complete_multipart_upload(  # type: ignore[attr-defined]
        Bucket="bench",
        Key="baseline",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": parts},
    )
    put_rate = size / MiB / (time.monotonic() - start)
    start = time.monotonic()
    body = client.get_object(Bucket="bench", Key="baseline")["Body"]  # type: ignore[attr-defined]
    while body.read(MiB):
        pass
    get_rate = size / MiB / (time.monotonic() - start)
    client.delete_object(Bucket="bench", Key="baseline")  # type: ignore[attr-defined]
    return put_rate, get_rate


def run_measured(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Run a command; (seconds, peak RSS in bytes) of that one process."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.read().decode()[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024


def worker_pids(home: Path, pipeline: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"worker" in argv and pipeline.encode() in argv and str(home).encode() in environ:
            pids.append(int(proc.name))
    return pids


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


async def wait_job(settings: Settings, pipeline: str, timeout: float) -> object:
    async with open_api(settings) as api:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = [j for j in await api.pipelines.list_jobs(pipeline) if j.done]
            if jobs:
                return jobs[0]
            await asyncio.sleep(0.2)
    raise RuntimeError(f"no finished job of {pipeline} within {timeout}s")


def pipeline_run(
    cli: list[str], env: dict[str, str], settings: Settings, tmp: Path, name: str, cmd: str
) -> dict:
    spec = {
        "pipeline": {"name": name},
        "input": {"pfs": {"repo": "big", "glob": "/*"}},
        "transform": {"cmd": ["sh", "-c", cmd]},
    }
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    start = time.monotonic()
    subprocess.run([*cli, "create", "pipeline", "-f", str(path)], env=env, check=True)
    peak = 0
    job = None

    async def watch() -> object:
        nonlocal peak
        task = asyncio.create_task(wait_job(settings, name, timeout=3600))
        while not task.done():
            for pid in worker_pids(Path(settings.home), name):
                with contextlib.suppress(OSError):
                    peak = max(peak, peak_rss(pid))
            await asyncio.sleep(0.2)
        return task.result()

    job = asyncio.run(watch())
    elapsed = time.monotonic() - start
    for pid in worker_pids(Path(settings.home), name):
        with contextlib.suppress(OSError):
            peak = max(peak, peak_rss(pid))
    return {"seconds": elapsed, "job": job, "worker_peak_rss": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--keep", action="store_true", help="Keep the temporary directory.")
    args = parser.parse_args()
    size = args.size_mib * MiB

    tmp = Path(tempfile.mkdtemp(prefix="df-s3-bench-"))
    moto, endpoint = start_moto()
    home = tmp / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATUMFLOW_", "AWS_"))}
    env.update(
        DATUMFLOW_HOME=str(home),
        DATUMFLOW_S3_ENDPOINT=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        DATUMFLOW_ACK_WAIT="60",
    )
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    cli = [sys.executable, "-m", "datumflow.cli.main"]
    try:
        import botocore.session

        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=endpoint, region_name="us-east-1"
        )
        client.create_bucket(Bucket="bench")
        subprocess.run([*cli, "up", "--detach", "--storage", "s3://bench/df"], env=env, check=True)
        instance = read_instance(home)
        assert instance is not None
        settings = Settings(
            home=str(home),
            nats_url=instance.nats_url,
            storage=instance.storage,
            s3_endpoint=endpoint,
        )

        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
        data = tmp / "big.bin"
        t0 = time.monotonic()
        write_random(data, size)
        print(f"wrote {args.size_mib} MiB of random data in {time.monotonic() - t0:.1f}s")
        put_rate, get_rate = baseline(client, data, size)
        print(
            f"baseline, plain botocore against the same moto: multipart upload {put_rate:.1f}"
            f" MiB/s, GET {get_rate:.1f} MiB/s"
        )
        subprocess.run([*cli, "create", "repo", "big"], env=env, check=True)
        put_s, put_rss = run_measured(
            [*cli, "put", "file", "big@master:/big.bin", "-f", str(data)], env
        )
        data.unlink()
        mib = size / MiB
        print(
            f"put file: {put_s:.1f}s, {mib / put_s:.1f} MiB/s"
            f" (peak RSS of the put process {put_rss / MiB:.0f} MiB)"
        )
        for name, cmd in (
            ("cat", "cat /pfs/big/big.bin > /pfs/out/big.bin"),
            ("headed", "{ echo header; cat /pfs/big/big.bin; } > /pfs/out/big.bin"),
        ):
            run = pipeline_run(cli, env, settings, tmp, name, cmd)
            job = run["job"]
            stats = job.stats  # type: ignore[attr-defined]
            state = job.state  # type: ignore[attr-defined]
            print(
                f"pipeline {name}: job {state} in {run['seconds']:.1f}s from create pipeline,"
                f" {mib / run['seconds']:.1f} MiB/s end to end; worker: download"
                f" {stats.download_time:.1f}s ({mib / max(stats.download_time, 1e-9):.0f} MiB/s),"
                f" process {stats.process_time:.1f}s, upload {stats.upload_time:.1f}s"
                + (
                    " (hashing the output; the content was stored already: one HEAD)"
                    if name == "cat"
                    else f" ({stats.upload_bytes / MiB / max(stats.upload_time, 1e-9):.0f} MiB/s)"
                )
                + ";"
                f" worker peak RSS {run['worker_peak_rss'] / MiB:.0f} MiB"
            )
    finally:
        subprocess.run([*cli, "down"], env=env, check=False)
        moto.send_signal(signal.SIGTERM)
        moto.wait(timeout=30)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    main()
