"""One error root, split by what the caller should do next.

A handler that raises `PermanentError` gets its message terminated and published to the dead-letter
subject: trying again cannot help. `TemporaryError` means "try again later": the message is nak'ed with
a delay. Anything else escaping a handler is treated as temporary, because a bug we have not seen
should not silently drop data.
"""

from __future__ import annotations


class DatumflowError(Exception):
    """Root of every error datumflow raises on purpose."""


class PermanentError(DatumflowError):
    """Retrying cannot succeed: bad input, a missing object, an invalid spec."""


class TemporaryError(DatumflowError):
    """Retrying later may succeed: the broker or the object store is unreachable or busy."""

    def __init__(self, message: str, *, delay: float = 1.0) -> None:
        super().__init__(message)
        self.delay = delay


class SpecError(PermanentError):
    """A pipeline spec is invalid; the message names the field."""


class NotFound(PermanentError):
    """A repo, branch, commit, file, pipeline or job does not exist."""


class Conflict(DatumflowError):
    """A compare-and-set lost the race; re-read and try again."""


class BranchMoved(PermanentError):
    """A commit named the head it was built on as its parent, and the branch has moved since."""


class Superseded(DatumflowError):
    """This replica lost its lease: another one is active now, and this one must write nothing
    more until it holds the lease again."""


class BrokerError(TemporaryError):
    """NATS failed (timeout, disconnect, no responders). Wrapped at the broker boundary."""


class BrokerFull(BrokerError):
    """The broker is out of room: its storage or memory, or one of its limits (streams, consumers,
    an account's or a stream's bytes), is used up. Nothing is wrong with the message, which waits
    in its stream until an operator frees space or raises the limit."""


class BrokerForbidden(BrokerError):
    """The user datumflow connects as may not use a subject. Temporary, with a long delay, like
    `BrokerFull`: it is about the deployment, not the message, which waits in its stream until an
    operator grants the permission (a dead letter for every message meanwhile would need them all
    replayed)."""


class BrokerRefused(PermanentError):
    """The broker answered and refused, as it will every time the same request is made: a bad
    request, a message over a size limit, an invalid name. The message says
    what datumflow was doing, the server's words (`description`, `err_code`) and what to do."""

    def __init__(
        self, message: str, *, code: int = 0, err_code: int = 0, description: str = ""
    ) -> None:
        super().__init__(message)
        self.code = code
        """The status of the refusal (400, 404, ...); 0 for one the client made itself."""
        self.err_code = err_code
        """JetStream's own code for it (10054: message too large, ...); 0 if none came."""
        self.description = description


class BrokerNotFound(BrokerError):
    """The broker has no such stream, consumer, bucket, key or message.

    Temporary, with a long delay, like `BrokerFull`: it is about the deployment, not about the
    message being handled. In a cluster a server answers "stream not found" or "consumer not
    found" for a moment while it is still setting the stream up (a server restarting while the
    stream elects a leader), and a stream really missing is mended by `datumflow up`, which
    declares them all; every message would meet it meanwhile, and a dead letter for each would
    need an operator to replay them.

    Not a `NotFound`: callers read that as "no such record" and go on (a pipeline deleted while
    its event was in flight), which a missing stream or bucket is not."""

    def __init__(
        self,
        message: str,
        *,
        delay: float = 10.0,
        code: int = 404,
        err_code: int = 0,
        description: str = "",
    ) -> None:
        super().__init__(message, delay=delay)
        self.code = code
        self.err_code = err_code
        """JetStream's own code for it (10059: stream not found, 10014: consumer not found)."""
        self.description = description


class TopologyRefused(PermanentError):
    """The broker cannot keep the streams and buckets as asked (their replicas): the message says
    what to change."""


class StorageError(TemporaryError):
    """The object store failed in a way that may pass."""
