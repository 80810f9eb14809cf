"""A real `datumflow up` on the S3 backend (moto's server), its ingest function among the rest."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from tests.helpers import Cluster


def use_s3(cluster: Cluster, *, storage: str, endpoint: str) -> Cluster:
    """Point the test's own view of the cluster (cluster.api()) at the S3 store it runs on."""
    cluster.settings = msgspec.structs.replace(
        cluster.settings, storage=storage, s3_endpoint=endpoint
    )
    return cluster


def s3_cluster(
    make_cluster: Callable[..., Cluster], *, storage: str, endpoint: str, **extra: str
) -> Cluster:
    """`datumflow up` with DATUMFLOW_STORAGE=s3://... (AWS_* credentials come from the env)."""
    cluster = make_cluster(DATUMFLOW_STORAGE=storage, DATUMFLOW_S3_ENDPOINT=endpoint, **extra)
    return use_s3(cluster, storage=storage, endpoint=endpoint)


def copy_pipeline(name: str, repo: str, *, parallelism: int = 1) -> dict:
    """Each file of `repo` (glob /*) copied with `cat` to the same path in the output."""
    return {
        "pipeline": {"name": name},
        "input": {"pfs": {"repo": repo, "glob": "/*"}},
        "transform": {
            "cmd": [
                "sh",
                "-c",
                f'for f in /pfs/{repo}/*; do cat "$f" > "/pfs/out/$(basename "$f")"; done',
            ]
        },
        "parallelism_spec": {"constant": parallelism},
    }


async def repo_files(cluster: Cluster, repo: str) -> dict[str, bytes]:
    """The head of repo@master, read through the store (in place for referenced files)."""
    async with cluster.api() as api:
        head = await api.repos.head(repo, "master")
        out = {}
        for ref in await api.repos.files(head):
            if ref.source is not None:
                out[ref.path] = b"".join([c async for c in api.store.read_source(ref.source)])
            else:
                out[ref.path] = await api.store.get_bytes(ref.hash)
        return out
