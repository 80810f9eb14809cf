"""Repos, commits and files: `create repo`, `list commit`, `put file`, `get file`, ..."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import TypedDict

import typer

from datumflow.broker.messages import FileRef
from datumflow.cli.bucket_feeds import create_fed_repo, get_file_to, read_file
from datumflow.cli.context import (
    Api,
    address_of,
    ago,
    emit_json,
    fail,
    human_size,
    run,
    settings_of,
    table,
    with_api,
)
from datumflow.cli.progress import Bars, wanted
from datumflow.errors import DatumflowError, NotFound
from datumflow.pfs import manifest
from datumflow.pfs.bucket_sources import BucketSources, check_subject, parse_bucket_url, source_url
from datumflow.pfs.paths import clean_path, join


def create_repo(
    ctx: typer.Context,
    name: str,
    description: str = typer.Option("", "--description", "-d"),
    from_bucket: str = typer.Option(
        "",
        "--from-bucket",
        metavar="s3://BUCKET[/PREFIX]",
        help="Feed the repo from a bucket: objects under the prefix become its files, by their"
        " bucket notifications (see `datumflow ingest`).",
    ),
    branch: str = typer.Option("master", "--branch", "-b", help="Branch fed from the bucket."),
    subject: str = typer.Option(
        "",
        "--subject",
        help="NATS subject the bucket's notifications arrive on (otherwise any df.ingest.* one).",
    ),
) -> None:
    """Create a repo, optionally fed from a bucket's notifications."""
    if (subject or branch != "master") and not from_bucket:
        fail("--subject and --branch go with --from-bucket")
    if from_bucket:
        try:
            parse_bucket_url(from_bucket)
            if subject:
                check_subject(subject)
        except DatumflowError as exc:
            fail(str(exc))

    async def body(api: Api) -> None:
        if not from_bucket:
            await api.repos.create_repo(name, description=description)
            return
        await create_fed_repo(api, name, description, from_bucket, branch, subject)

    run(with_api(settings_of(ctx), body))


def list_repo(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """List repos."""

    async def body(api: Api) -> None:
        repos = await api.repos.list_repos()
        feeds: dict[str, list[str]] = {}
        for mapping in await BucketSources(broker=api.broker).list():
            feeds.setdefault(mapping.repo, []).append(source_url(mapping))
        rows = []
        for r in repos:
            head = await api.repos.head(r.name, "master")
            rows.append((r, head))
        if as_json:
            emit_json(
                [
                    {
                        "name": r.name,
                        "created": r.created,
                        "size_bytes": h.size_bytes if h else 0,
                        "description": r.description,
                        "pipeline": r.pipeline,
                        "from_bucket": sorted(feeds.get(r.name, [])),
                    }
                    for r, h in rows
                ]
            )
            return
        table(
            ["NAME", "CREATED", "SIZE (MASTER)", "DESCRIPTION"],
            [
                (r.name, ago(r.created), human_size(h.size_bytes if h else 0), r.description)
                for r, h in rows
            ],
        )

    run(with_api(settings_of(ctx), body))


def delete_repo(ctx: typer.Context, name: str) -> None:
    """Delete a repo with its branches and commits."""

    async def body(api: Api) -> None:
        info = await api.repos.get_repo(name)
        if info.pipeline:
            fail(f"repo {name} is the output of pipeline {info.pipeline}; delete the pipeline")
        await api.repos.delete_repo(name)
        await BucketSources(broker=api.broker).remove_repo(name)

    run(with_api(settings_of(ctx), body))


def list_commit(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="REPO[@BRANCH]"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List the commits of a branch, newest first."""
    address = address_of(target)

    async def body(api: Api) -> None:
        commits = await api.repos.list_commits(address.repo, address.ref)
        if as_json:
            emit_json(commits)
            return
        table(
            ["REPO", "BRANCH", "COMMIT", "FINISHED", "SIZE", "FILES", "ORIGIN"],
            [
                (
                    c.repo,
                    c.branch,
                    c.id,
                    ago(c.finished),
                    human_size(c.size_bytes),
                    c.files,
                    c.origin,
                )
                for c in commits
            ],
        )

    run(with_api(settings_of(ctx), body))


def inspect_commit(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="REPO@COMMIT"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show one commit (a commit id or a branch name)."""
    address = address_of(target)

    async def body(api: Api) -> None:
        info = await api.repos.inspect_commit(address.repo, address.ref)
        if as_json:
            emit_json(info)
            return
        for field, value in (
            ("Commit", f"{info.repo}@{info.id}"),
            ("Branch", info.branch),
            ("Parent", info.parent or "-"),
            ("Origin", info.origin),
            ("Files", info.files),
            ("Size", human_size(info.size_bytes)),
            ("Finished", ago(info.finished)),
            ("Provenance", ", ".join(f"{p.repo}@{p.commit}" for p in info.provenance) or "-"),
            ("Job", info.job or "-"),
        ):
            typer.echo(f"{field + ':':<12} {value}")

    run(with_api(settings_of(ctx), body))


def put_file(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="REPO@BRANCH:/PATH"),
    file: str = typer.Option(..., "--file", "-f", help="Local file or directory; - for stdin."),
    recursive: bool = typer.Option(False, "--recursive", "-r"),
    full_path: bool = typer.Option(False, "--full-path", help="Keep the local path under /PATH."),
) -> None:
    """Put a file, a directory (-r) or stdin (-f -) into a branch, as one commit."""
    address = address_of(target if ":" in target else target + ":/")
    source = Path(file)
    if file != "-" and not source.exists():
        fail(f"{file}: no such file or directory")
    if file != "-" and source.is_dir() and not recursive:
        fail(f"{file} is a directory; add -r to put its contents")

    async def body(api: Api) -> None:
        await api.repos.get_repo(address.repo)
        repo_info = await api.repos.get_repo(address.repo)
        if repo_info.pipeline:
            fail(
                f"repo {address.repo} is the output of pipeline {repo_info.pipeline}; it is written by its jobs only"
            )
        refs: list[FileRef] = []
        pairs = _plan_put(file, source, address.path, full_path=full_path)
        for local, _ in pairs if recursive else []:
            if not os.access(local, os.R_OK) or not local.is_file():
                # A broken link (an editor's lock file), a socket, a file not ours to read.
                raise DatumflowError(
                    f"{local}: not a file that can be read; nothing was put: remove it, or put"
                    " the rest without it"
                )
        total = sum(local.stat().st_size for local, _ in pairs) if recursive else 0
        sent = 0
        with Bars(show=recursive and wanted()) as bars:
            counts = f"0/{len(pairs)} files, 0B/{human_size(total)}"
            bars.set("put", label=target, done=0, total=total, counts=counts)
            for local, path in pairs:
                key, size = await api.store.put_file(local)
                refs.append(FileRef(path=path, size=size, hash=key))
                sent += size
                counts = f"{len(refs)}/{len(pairs)} files, {human_size(sent)}/{human_size(total)}"
                bars.set("put", label=target, done=sent, total=total, counts=counts)
        info = await api.repos.commit_files(address.repo, address.ref, puts=refs)
        typer.echo(f"{info.repo}@{info.id}: {len(refs)} file(s)", err=True)

    if file == "-":
        with tempfile.NamedTemporaryFile(delete=False) as tmp:
            for chunk in iter(lambda: sys.stdin.buffer.read(1 << 20), b""):
                tmp.write(chunk)
        source = Path(tmp.name)
        try:
            run(with_api(settings_of(ctx), body))
        finally:
            os.unlink(tmp.name)
        return
    run(with_api(settings_of(ctx), body))


def _plan_put(file: str, source: Path, path: str, *, full_path: bool) -> list[tuple[Path, str]]:
    """(local file, repo path) pairs. A directory's contents go under PATH, relative to it."""
    if file == "-" or source.is_file():
        if file != "-" and (path == "/" or path.endswith("/")):
            return [(source, join(path, source.name))]
        return [(source, clean_path(path))]
    pairs = []
    for dirpath, _dirs, names in os.walk(source):
        for name in names:
            local = Path(dirpath) / name
            relative = local.as_posix() if full_path else local.relative_to(source).as_posix()
            pairs.append((local, join(path, relative)))
    return sorted(pairs, key=lambda p: p[1])


def list_file(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="REPO@BRANCH[:/DIR]"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List the files and directories directly under a directory."""
    address = address_of(target)

    async def body(api: Api) -> None:
        info = await api.repos.inspect_commit(address.repo, address.ref)
        entries = _directory(await manifest.read(api.store, info.manifest), address.path)
        if entries is None:
            raise NotFound(f"{target}: no such file or directory")
        if as_json:
            emit_json(entries)
            return
        table(
            ["NAME", "TYPE", "SIZE"],
            [(e["path"], e["type"], human_size(e["size"])) for e in entries],
        )

    run(with_api(settings_of(ctx), body))


class _Entry(TypedDict):
    path: str
    type: str
    size: int


def _directory(files: list[FileRef], directory: str) -> list[_Entry] | None:
    prefix = "/" if directory == "/" else directory.rstrip("/") + "/"
    children: dict[str, _Entry] = {}
    for f in files:
        if f.path == directory:
            return [{"path": f.path, "type": "file", "size": f.size}]
        if not f.path.startswith(prefix):
            continue
        head, _, rest = f.path[len(prefix) :].partition("/")
        path = prefix + head
        entry = children.setdefault(
            path,
            {"path": path + ("/" if rest else ""), "type": "dir" if rest else "file", "size": 0},
        )
        entry["size"] += f.size
    if not children and directory != "/":
        return None
    return [children[k] for k in sorted(children)]


def get_file(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="REPO@BRANCH:/PATH"),
    output: str = typer.Option("", "--output", "-o", help="Write here instead of stdout."),
) -> None:
    """Print a file, or write it with -o."""
    address = address_of(target, need_path=True)

    async def body(api: Api) -> None:
        info = await api.repos.inspect_commit(address.repo, address.ref)
        for f in await manifest.read(api.store, info.manifest):
            if f.path == address.path:
                if output:
                    await get_file_to(api.store, f, Path(output))
                else:
                    async for chunk in read_file(api.store, f):
                        sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
                return
        raise NotFound(f"{target}: no such file (is it a directory? try `datumflow list file`)")

    run(with_api(settings_of(ctx), body))
