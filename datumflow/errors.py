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


class TopologyRefused(PermanentError):
    """The broker cannot keep the streams and buckets as asked (their replicas): the message says
    what to change."""


class StorageError(TemporaryError):
    """The object store failed in a way that may pass."""
