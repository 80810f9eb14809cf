"""`next datum`: how the user code of a pipeline with `transform.datum_batching` asks its worker
for each datum, from Python (`next_datum()`) or from a shell (`datumflow-next-datum`).

The code is started once per worker and loops: each call reports the datum in hand as done (what
it wrote under /pfs/out is that datum's output), or as failed with `error`, and returns when the
next datum's inputs are at /pfs/<input> and /pfs/out is empty. When there are no more datums (the
worker is stopping) the call says so, and the code should exit 0.

This module is what the user code's process loads: standard library only, and nothing else of
datumflow, so that a call costs a round trip on a Unix socket, not the import of the whole CLI.
From a shell, the `datumflow-next-datum` first on the code's PATH is the worker's `#!/bin/sh`
client (datumflow.functions.worker.batch_fifo), which starts no interpreter; `main` here is the
same command through the socket, for where that one is not at hand. The worker's end is
datumflow.functions.worker.batched.
"""

from __future__ import annotations

import _socket  # not `socket`: its enums and selectors cost more than the call itself
import os
import sys

from datumflow.errors import DatumflowError

SOCKET_VAR = "DF_BATCH_SOCKET"
"""The environment variable holding the path of the worker's socket."""
NO_MORE = 3
"""`datumflow-next-datum`'s exit status when there are no more datums: the code should exit 0."""
FAILED = 2
"""Its exit status when it could not ask (not run by a worker, or the worker is gone)."""


class BatchingError(DatumflowError):
    """The worker could not be asked: the code does not run under a datum-batching worker, or the
    worker went away."""


def next_datum(*, error: str = "") -> dict[str, str] | None:
    """Report the datum in hand done (failed, if `error` is set) and wait for the next one.

    Returns the next datum's variables (each input's name → its path, `PFS`, `PACH_DATUM_ID`,
    `PACH_JOB_ID`...), which are also set in `os.environ`; None when there are no more datums,
    in which case the code should exit 0. The first call reports nothing: there is no datum in
    hand yet."""
    path = os.environ.get(SOCKET_VAR)
    if not path:
        raise BatchingError(
            f"${SOCKET_VAR} is not set: next datum is for the user code of a pipeline with"
            " transform.datum_batching, run by its worker"
        )
    # The wire: the error (NUL-free) and a shut-down write side; the answer is b"D" and the
    # variables as NUL-separated `name=value`, b"N" for no more datums, or b"E" and why the call
    # is refused. No json: it imports
    # `re`, which alone costs more than the round trip.
    request = error.replace("\0", " ").encode()
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    reply = bytearray()
    try:
        conn.connect(path)
        conn.sendall(request)
        conn.shutdown(_socket.SHUT_WR)
        while chunk := conn.recv(65536):
            reply.extend(chunk)
    except OSError as exc:
        raise BatchingError(f"asking the worker at {path} for the next datum: {exc}") from None
    finally:
        conn.close()
    if reply[:1] == b"N":
        return None
    if reply[:1] == b"E":
        raise BatchingError(reply[1:].decode(errors="replace"))
    if reply[:1] != b"D":
        raise BatchingError("the worker closed the connection without a datum: it is stopping")
    env = dict(entry.split("=", 1) for entry in reply[1:].decode().split("\0") if entry)
    os.environ.update(env)
    return env


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def main(argv: list[str] | None = None) -> int:
    """`datumflow-next-datum [--error MESSAGE]`: print the next datum's variables as `export`
    lines for `eval`, exit 0; exit NO_MORE when there are none."""
    args = sys.argv[1:] if argv is None else argv
    error = ""
    if args[:1] == ["next"]:
        args = args[1:]  # `python -m datumflow.batching next`
    if args[:1] == ["datum"]:
        args = args[1:]
    if len(args) == 2 and args[0] == "--error":
        error = args[1] or "failed"
    elif args:
        print(
            "usage: datumflow-next-datum [--error MESSAGE]\n"
            f"exits 0 with the next datum ready, {NO_MORE} when there are no more datums",
            file=sys.stderr,
        )
        return FAILED
    try:
        env = next_datum(error=error)
    except BatchingError as exc:
        print(f"next datum: {exc}", file=sys.stderr)
        return FAILED
    if env is None:
        return NO_MORE
    sys.stdout.write("".join(f"export {k}={_quote(v)}\n" for k, v in sorted(env.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
