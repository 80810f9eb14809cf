"""Bucket notifications: what changed in a bucket, and where that lands in a repo. Pure: no I/O.

Two payload shapes arrive here:

- MinIO (NATS, webhook and other targets): an envelope `{"EventName": "s3:ObjectCreated:Put",
  "Key": "bucket/key", "Records": [...]}`; event names carry the `s3:` prefix; delete records have
  no `size` nor `eTag`.
- AWS S3 (via SNS/SQS/EventBridge-to-NATS bridges): `{"Records": [...]}` only, `eventName` without
  the prefix (`ObjectCreated:Put`). Configuring a bucket's notifications sends one `s3:TestEvent`
  that has no records.

Both URL-encode `s3.object.key` the way HTML forms do (space as `+`, `+` as `%2B`), so keys are
decoded with `unquote_plus`. A payload we cannot read raises PermanentError naming the problem:
retrying the same bytes cannot help, and the caller dead-letters it.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple
from urllib.parse import unquote_plus

import msgspec

from datumflow.errors import PermanentError

ChangeKind = Literal["put", "delete"]

# Events under ObjectCreated that touch only an object's metadata (MinIO emits them); the content,
# and so the repo file, is unchanged.
_METADATA_ONLY = frozenset(
    {
        "ObjectCreated:PutRetention",
        "ObjectCreated:PutLegalHold",
        "ObjectCreated:PutTagging",
        "ObjectCreated:DeleteTagging",
    }
)


class ObjectChange(msgspec.Struct, frozen=True, kw_only=True):
    """One object written or removed, as a bucket notification reported it."""

    bucket: str
    key: str
    """The object key, decoded (`a b+c.txt`, not `a+b%2Bc.txt`)."""
    event: ChangeKind
    event_name: str
    """The event as sent, without the `s3:` prefix, e.g. `ObjectCreated:Put`."""
    size: int | None = None
    """None when the event does not say (MinIO deletes)."""
    etag: str = ""
    """Without quotes; "" when the event does not say."""
    version_id: str = ""
    sequencer: str = ""
    """Orders the events of one key: compare as hex strings of equal length."""
    event_time: str = ""


class BucketMapping(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Objects of `bucket` under `prefix` are files of `repo`@`branch`, minus the prefix."""

    bucket: str
    prefix: str = ""
    """A key prefix taken as a directory: "raw" matches raw/a.csv, not rawdata/a.csv."""
    repo: str
    branch: str = "master"
    subject: str = ""
    """The NATS subject the bucket's notifications arrive on; "" for ingest's default."""


class RepoPath(NamedTuple):
    repo: str
    branch: str
    path: str


def _event_kind(name: str) -> ChangeKind | None:
    if name.startswith("ObjectCreated:"):
        return None if name in _METADATA_ONLY else "put"
    if name.startswith("ObjectRemoved:"):
        return "delete"
    # AWS lifecycle expiration removes the current object (or hides it behind a delete marker):
    # for the repo that is a delete, or it would keep a file whose bytes are gone.
    if name in ("LifecycleExpiration:Delete", "LifecycleExpiration:DeleteMarkerCreated"):
        return "delete"
    return None


def _field(obj: dict[str, Any], name: str, where: str) -> Any:
    if name not in obj:
        raise PermanentError(f"bucket notification: {where} has no {name!r}")
    return obj[name]


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PermanentError(
            f"bucket notification: {where} is {type(value).__name__}, not an object"
        )
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise PermanentError(
            f"bucket notification: {where} is {type(value).__name__}, not a string"
        )
    return value


def _optional_string(obj: dict[str, Any], name: str, where: str) -> str:
    value = obj.get(name)
    return "" if value is None else _string(value, f"{where}.{name}")


def _parse_record(record: Any, where: str) -> ObjectChange | None:
    record = _mapping(record, where)
    name = _string(_field(record, "eventName", where), f"{where}.eventName")
    name = name.removeprefix("s3:")
    kind = _event_kind(name)
    if kind is None:
        return None
    s3 = _mapping(_field(record, "s3", where), f"{where}.s3")
    bucket = _mapping(_field(s3, "bucket", f"{where}.s3"), f"{where}.s3.bucket")
    bucket_name = _string(_field(bucket, "name", f"{where}.s3.bucket"), f"{where}.s3.bucket.name")
    obj = _mapping(_field(s3, "object", f"{where}.s3"), f"{where}.s3.object")
    key = _string(_field(obj, "key", f"{where}.s3.object"), f"{where}.s3.object.key")
    if not bucket_name or not key:
        raise PermanentError(f"bucket notification: {where} has an empty bucket name or key")
    size = obj.get("size")
    # bool is an int to Python, never a size.
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise PermanentError(f"bucket notification: {where}.s3.object.size is {size!r}")
    return ObjectChange(
        bucket=bucket_name,
        key=unquote_plus(key),
        event=kind,
        event_name=name,
        size=size,
        etag=_optional_string(obj, "eTag", f"{where}.s3.object").strip('"'),
        version_id=_optional_string(obj, "versionId", f"{where}.s3.object"),
        sequencer=_optional_string(obj, "sequencer", f"{where}.s3.object"),
        event_time=_optional_string(record, "eventTime", where),
    )


def parse_notification(payload: bytes | str) -> list[ObjectChange]:
    """The object writes and removals in a MinIO or AWS S3 notification, in record order.

    Events other than object creation and removal (reads, ACL or tag changes, restores, test
    events) give no change. Raises PermanentError when the payload is not a notification.
    """
    try:
        doc = msgspec.json.decode(payload)
    except msgspec.DecodeError as exc:
        raise PermanentError(f"bucket notification is not JSON: {exc}") from None
    doc = _mapping(doc, "the payload")
    if doc.get("Event") == "s3:TestEvent" and "Records" not in doc:
        # Sent once by AWS when notifications are configured on a bucket; it describes no object.
        return []
    records = doc.get("Records")
    if records is None:
        raise PermanentError(
            "bucket notification has no 'Records' list: expected a MinIO or AWS S3 event, got "
            f"an object with keys {sorted(doc)[:10]}"
        )
    if not isinstance(records, list):
        raise PermanentError(
            f"bucket notification: 'Records' is {type(records).__name__}, not a list"
        )
    changes = []
    for index, record in enumerate(records):
        change = _parse_record(record, f"Records[{index}]")
        if change is not None:
            changes.append(change)
    return changes


def map_change(change: ObjectChange, mappings: list[BucketMapping]) -> RepoPath | None:
    """The repo, branch and absolute path of a changed object, or None if no mapping covers it.

    The most specific mapping (longest prefix) wins. A directory marker (a key ending in `/`, as
    web consoles create) is not a file and maps to None. A covered key that cannot be a repo path
    (an empty, `.` or `..` segment) raises PermanentError.
    """
    best: BucketMapping | None = None
    best_prefix = ""
    for mapping in mappings:
        if mapping.bucket != change.bucket:
            continue
        prefix = mapping.prefix.strip("/")
        if prefix and not change.key.startswith(prefix + "/"):
            continue
        if best is None or len(prefix) > len(best_prefix):
            best, best_prefix = mapping, prefix
    if best is None:
        return None
    rest = change.key[len(best_prefix) + 1 :] if best_prefix else change.key
    if not rest or rest.endswith("/"):
        return None
    segments = rest.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise PermanentError(
            f"object key {change.key!r} in bucket {change.bucket!r} cannot be a file of repo "
            f"{best.repo!r}: it has an empty, '.' or '..' path segment; rename the object"
        )
    return RepoPath(best.repo, best.branch, "/" + rest)
