"""`next datum` from a shell without a Python interpreter: a pair of named pipes (FIFOs) the worker
serves next to its socket, and the `#!/bin/sh` client it puts first on the code's PATH.

A call is one request line written to `next.req`, `<pid> done` or `<pid> error <message>`, and
one reply line read from `rep.<pid>`, a pipe the caller made and opened before asking (the worker
removes it once open): `<pid> D <export lines>`, `<pid> N` (no more datums) or `<pid> E <why the
call is refused>`. In messages and replies a backslash is `\\\\` and a newline `\\n`, so that
each stays one line. The worker holds the request pipe open for reading and writing: a request
never meets a pipe without a reader, and the worker's reader never sees its end.

The pipes and the client are in the session's directory (mode 0700, owned by the user the code
runs as, outside /pfs so the code's mount namespace leaves it alone): no other user reaches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

from datumflow.batching import FAILED, NO_MORE

log = logging.getLogger(__name__)

REQUEST = "next.req"
CLIENT = "datumflow-next-datum"
LINE_LIMIT = 1 << 20
"""Bytes of one request line read at most (a message escaped is up to twice its length)."""
GARBLED = (
    "a next datum request line is `<pid> done` or `<pid> error <message>`"
    " (use the datumflow-next-datum client)"
)

_SCRIPT = r"""#!/bin/sh
# datumflow-next-datum [--error MESSAGE]: report the datum in hand done (failed, with --error)
# and wait for the next one; prints its variables as `export` lines for `eval` and exits 0, or
# exits @NO_MORE@ when there are no more datums (the code should exit 0), @FAILED@ when it cannot ask.
d='@DIR@'
[ "$1" = next ] && shift
[ "$1" = datum ] && shift
kind=done msg=
if [ $# -eq 2 ] && [ "$1" = --error ]; then
  kind=error msg=${2:-failed}
elif [ $# -ne 0 ]; then
  printf 'usage: datumflow-next-datum [--error MESSAGE]\nexits 0 with the next datum ready, @NO_MORE@ when there are no more datums\n' >&2
  exit @FAILED@
fi
nl='
'
sub() {
  out=
  while :; do
    case $s in
      *"$1"*) out=$out${s%%"$1"*}$2; s=${s#*"$1"} ;;
      *) s=$out$s; return ;;
    esac
  done
}
s=$msg
sub '\' '\\'
sub "$nl" '\n'
# The reply comes on a pipe of this call's own, open before the request is sent.
r="$d/rep.$$"
[ -p "$r" ] || mkfifo -m 600 "$r" || exit @FAILED@
exec 3<>"$r"
printf '%s %s %s\n' "$$" "$kind" "$s" > "$d/next.req" || exit @FAILED@
IFS= read -r line <&3
rest=${line#"$$ "}
case $rest in
  D*) printf '%b' "${rest#D }"; exit 0 ;;
  N*) exit @NO_MORE@ ;;
  E*) printf 'next datum: %b\n' "${rest#E }" >&2; exit @FAILED@ ;;
esac
echo "next datum: no answer from the worker through $d" >&2
exit @FAILED@
"""


def client_script(directory: Path) -> str:
    """The sh client, for the pipes in `directory`."""
    text = _SCRIPT.replace("@NO_MORE@", str(NO_MORE)).replace("@FAILED@", str(FAILED))
    return text.replace("@DIR@", str(directory).replace("'", "'\\''"))


def escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], text)


def quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


class Pipes:
    """The worker's ends of one session's pipes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.bin = directory / "bin"
        self._request = -1
        self._reader: asyncio.Task[None] | None = None

    def create(self, run_as: tuple[int, int] | None) -> None:
        """The pipes and the client, owned by `run_as` if given."""
        self.bin.mkdir(mode=0o700)
        client = self.bin / CLIENT
        client.write_text(client_script(self.directory))
        client.chmod(0o700)
        os.mkfifo(self.directory / REQUEST, 0o600)
        if run_as is not None:
            for path in (self.bin, client, self.directory / REQUEST):
                os.chown(path, *run_as)
        # Read and write: the pipe is never without a reader, nor its reader at its end.
        self._request = os.open(self.directory / REQUEST, os.O_RDWR | os.O_NONBLOCK)

    async def serve(self, take: Callable[[int, str | None, str], Awaitable[None]]) -> None:
        """Read request lines until closed: `take(pid, error, garbled)` for each, error None when
        the line was garbled (then `garbled` says how), pid 0 when it names no caller."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=LINE_LIMIT)
        pipe = os.fdopen(os.dup(self._request), "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError as exc:
                    head = await reader.readexactly(exc.consumed)
                    await _skip_line(reader)
                    pid_text = head.split(b" ", 1)[0]
                    pid = int(pid_text) if pid_text.isdigit() else 0
                    await take(pid, None, f"a request line longer than {LINE_LIMIT} bytes")
                    continue
                except asyncio.IncompleteReadError:
                    return
                pid, error, garbled = parse(line)
                await take(pid, error, garbled)
        finally:
            transport.close()

    def reply(self, pid: int, kind: str, text: str = "") -> bool:
        """Write one reply line to the pipe of `pid`'s call, which it holds open; False if it
        could not be (the caller is gone, or does not read)."""
        line = f"{pid} {kind}" + (f" {escape(text)}" if text else "") + "\n"
        path = self.directory / f"rep.{pid}"
        try:
            # The directory is the code's: as root, a symlink or file there must not be written.
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError as exc:
            log.warning("next datum: no pipe to answer %s on (%s): %s", pid, path, exc)
            return False
        data = line.encode()
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                log.warning("next datum: %s is no pipe; %s not answered", path, pid)
                return False
            with contextlib.suppress(OSError):
                os.unlink(path)
            # Never blocking: a write to a pipe its caller filled and does not read would stop
            # the worker's event loop for good. A reply fits an empty pipe (64 KiB).
            written = os.write(fd, data)
            if written < len(data):
                log.warning(
                    "next datum: %s does not read its reply pipe %s; %d of %d bytes answered",
                    pid,
                    path,
                    written,
                    len(data),
                )
            return written == len(data)
        except BlockingIOError:
            log.warning("next datum: %s does not read its reply pipe %s; not answered", pid, path)
            return False
        except OSError as exc:
            log.warning("next datum: answering %s on %s: %s", pid, path, exc)
            return False
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._request >= 0:
            with contextlib.suppress(OSError):
                os.close(self._request)
        self._request = -1


async def _skip_line(reader: asyncio.StreamReader) -> None:
    """The rest of an overlong line, thrown away."""
    while True:
        try:
            await reader.readuntil(b"\n")
            return
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)


def parse(line: bytes) -> tuple[int, str | None, str]:
    """A request line: (caller's pid or 0, the error it reports or None if garbled, why)."""
    text = line.decode(errors="replace").rstrip("\n")
    pid_text, _, rest = text.partition(" ")
    pid = int(pid_text) if pid_text.isdigit() else 0
    kind, _, message = rest.partition(" ")
    if pid and kind == "done" and not message:
        return pid, "", ""
    if pid and kind == "error":
        return pid, unescape(message) or "failed", ""
    return pid, None, f"{GARBLED}; got {text[:200]!r}"
