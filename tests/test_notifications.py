"""Parsing MinIO and AWS S3 bucket notifications, and mapping them onto repos."""

from __future__ import annotations

import json
from typing import Any

import pytest

from datumflow.errors import PermanentError
from datumflow.pfs.notifications import (
    BucketMapping,
    ObjectChange,
    RepoPath,
    map_change,
    parse_notification,
)
from tests.helpers import DATA

MINIO_REFERENCE = DATA / "minio-object-created-put.json"
"""An s3:ObjectCreated:Put notification as a MinIO server sent it, byte for byte."""


def aws_record(event: str, key: str, **obj: Any) -> dict[str, Any]:
    """A record as AWS S3 sends it (eventName without the s3: prefix)."""
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "eu-west-1",
        "eventTime": "2025-07-08T14:15:39.443Z",
        "eventName": event,
        "s3": {
            "s3SchemaVersion": "1.0",
            "bucket": {"name": "photos", "arn": "arn:aws:s3:::photos"},
            "object": {"key": key, **obj},
        },
    }


def minio_payload(event: str, key: str, **obj: Any) -> bytes:
    """A MinIO payload: the EventName/Key envelope, and s3: before event names."""
    record = aws_record(f"s3:{event}", key, **obj)
    record["eventSource"] = "minio:s3"
    envelope = {"EventName": f"s3:{event}", "Key": f"photos/{key}", "Records": [record]}
    return json.dumps(envelope).encode()


def test_minio_reference_put() -> None:
    changes = parse_notification(MINIO_REFERENCE.read_bytes())
    assert changes == [
        ObjectChange(
            bucket="mybucket",
            key="test.txt",
            event="put",
            event_name="ObjectCreated:Put",
            size=5,
            etag="d8e8fca2dc0f896fd7cb4cb0031ba249",
            sequencer="18504C4ADA8EBF58",
            event_time="2025-07-08T14:15:39.443Z",
        )
    ]


def test_aws_shape_put_with_version() -> None:
    payload = json.dumps(
        {
            "Records": [
                aws_record(
                    "ObjectCreated:CompleteMultipartUpload",
                    "raw/2025/cat.png",
                    size=1024,
                    eTag='"3858f62230ac3c915f300c664312c11f-2"',
                    versionId="3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY",
                    sequencer="0055AED6DCD90281E5",
                )
            ]
        }
    ).encode()
    [change] = parse_notification(payload)
    assert change.bucket == "photos"
    assert change.key == "raw/2025/cat.png"
    assert change.event == "put"
    assert change.event_name == "ObjectCreated:CompleteMultipartUpload"
    assert change.size == 1024
    assert change.etag == "3858f62230ac3c915f300c664312c11f-2"
    assert change.version_id == "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY"
    assert change.sequencer == "0055AED6DCD90281E5"


def test_text_payload_is_accepted() -> None:
    [change] = parse_notification(minio_payload("ObjectCreated:Put", "a.txt", size=1).decode())
    assert change.key == "a.txt"


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [
        ("my+photo.png", "my photo.png"),
        ("a%2Bb.txt", "a+b.txt"),
        ("dir+one/x%2By+z.txt", "dir one/x+y z.txt"),
        ("caf%C3%A9/%E2%9C%93.txt", "café/✓.txt"),
        ("100%25.txt", "100%.txt"),
    ],
)
def test_keys_are_url_decoded(encoded: str, decoded: str) -> None:
    for payload in (
        minio_payload("ObjectCreated:Put", encoded, size=3, eTag="abc"),
        json.dumps({"Records": [aws_record("ObjectCreated:Put", encoded, size=3)]}).encode(),
    ):
        [change] = parse_notification(payload)
        assert change.key == decoded


def test_minio_delete_has_no_size_or_etag() -> None:
    [change] = parse_notification(
        minio_payload("ObjectRemoved:Delete", "old+file.txt", sequencer="18504C4ADA8EBF59")
    )
    assert change.event == "delete"
    assert change.key == "old file.txt"
    assert change.size is None
    assert change.etag == ""
    assert change.sequencer == "18504C4ADA8EBF59"


def test_aws_delete_marker_is_a_delete() -> None:
    payload = json.dumps(
        {
            "Records": [
                aws_record("ObjectRemoved:DeleteMarkerCreated", "a.txt", versionId="v2"),
                aws_record("LifecycleExpiration:Delete", "b.txt"),
            ]
        }
    )
    changes = parse_notification(payload)
    assert [(c.key, c.event, c.version_id) for c in changes] == [
        ("a.txt", "delete", "v2"),
        ("b.txt", "delete", ""),
    ]


def test_other_events_are_ignored_and_order_kept() -> None:
    payload = json.dumps(
        {
            "Records": [
                aws_record("ObjectCreated:Put", "1.txt", size=1),
                aws_record("ObjectAccessed:Get", "2.txt", size=1),
                aws_record("s3:ObjectCreated:PutTagging", "3.txt"),
                aws_record("ObjectRestore:Completed", "4.txt", size=1),
                aws_record("ObjectRemoved:Delete", "5.txt"),
                aws_record("s3:ObjectCreated:Copy", "6.txt", size=2),
            ]
        }
    )
    changes = parse_notification(payload)
    assert [(c.key, c.event) for c in changes] == [
        ("1.txt", "put"),
        ("5.txt", "delete"),
        ("6.txt", "put"),
    ]


def test_aws_test_event_is_ignored() -> None:
    payload = json.dumps(
        {
            "Service": "Amazon S3",
            "Event": "s3:TestEvent",
            "Time": "2025-07-08T14:15:39.443Z",
            "Bucket": "photos",
            "RequestId": "5582815E1AEA5ADF",
            "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
        }
    )
    assert parse_notification(payload) == []


def test_empty_records() -> None:
    assert parse_notification(b'{"Records": []}') == []


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\xfe not json", "not JSON"),
        (b'{"Records": [', "not JSON"),
        (b"", "not JSON"),
        (b"[1, 2]", "the payload is list, not an object"),
        (b'{"EventName": "s3:ObjectCreated:Put", "Key": "b/k"}', "no 'Records' list"),
        (b'{"Records": {"eventName": "x"}}', "'Records' is dict, not a list"),
        (b'{"Records": ["x"]}', "Records[0] is str, not an object"),
        (b'{"Records": [{"s3": {}}]}', "Records[0] has no 'eventName'"),
        (b'{"Records": [{"eventName": 5}]}', "Records[0].eventName is int"),
        (b'{"Records": [{"eventName": "ObjectCreated:Put"}]}', "Records[0] has no 's3'"),
        (
            b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"object": {"key": "k"}}}]}',
            "Records[0].s3 has no 'bucket'",
        ),
        (
            b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {},'
            b' "object": {"key": "k"}}}]}',
            "Records[0].s3.bucket has no 'name'",
        ),
        (
            b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}}}]}',
            "Records[0].s3 has no 'object'",
        ),
        (
            b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"},'
            b' "object": {}}}]}',
            "Records[0].s3.object has no 'key'",
        ),
        (
            b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"},'
            b' "object": {"key": "k", "size": "5"}}}]}',
            "Records[0].s3.object.size is '5'",
        ),
        (
            b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": ""},'
            b' "object": {"key": "k"}}}]}',
            "empty bucket name or key",
        ),
    ],
)
def test_malformed_payloads(payload: bytes, message: str) -> None:
    with pytest.raises(PermanentError, match="bucket notification") as info:
        parse_notification(payload)
    assert message in str(info.value)


def test_a_bad_record_among_good_ones_names_its_index() -> None:
    payload = json.dumps(
        {"Records": [aws_record("ObjectCreated:Put", "ok.txt", size=1), {"eventName": "x:y"}, []]}
    )
    with pytest.raises(PermanentError, match=r"Records\[2\] is list"):
        parse_notification(payload)


def change(bucket: str, key: str) -> ObjectChange:
    return ObjectChange(bucket=bucket, key=key, event="put", event_name="ObjectCreated:Put")


MAPPINGS = [
    BucketMapping(bucket="photos", repo="all-photos"),
    BucketMapping(bucket="photos", prefix="raw/", repo="raw", branch="dev"),
    BucketMapping(bucket="photos", prefix="/raw/2025", repo="raw-2025"),
    BucketMapping(bucket="logs", prefix="app", repo="logs"),
]


@pytest.mark.parametrize(
    ("bucket", "key", "expected"),
    [
        ("photos", "cat.png", RepoPath("all-photos", "master", "/cat.png")),
        ("photos", "raw/cat.png", RepoPath("raw", "dev", "/cat.png")),
        ("photos", "raw/2025/07/cat one.png", RepoPath("raw-2025", "master", "/07/cat one.png")),
        ("photos", "rawdata/x.csv", RepoPath("all-photos", "master", "/rawdata/x.csv")),
        ("logs", "app/a+b.log", RepoPath("logs", "master", "/a+b.log")),
        ("logs", "application/x.log", None),
        ("logs", "app", None),
        ("logs", "app/dir/", None),
        ("other", "app/x.log", None),
    ],
)
def test_map_change(bucket: str, key: str, expected: RepoPath | None) -> None:
    assert map_change(change(bucket, key), MAPPINGS) == expected


def test_map_change_returns_a_tuple() -> None:
    repo, branch, path = map_change(change("photos", "raw/a"), MAPPINGS) or ("", "", "")
    assert (repo, branch, path) == ("raw", "dev", "/a")


@pytest.mark.parametrize("key", ["raw/a//b.txt", "raw/../etc/passwd", "raw/./a.txt", "/abs.txt"])
def test_map_change_refuses_keys_that_are_not_paths(key: str) -> None:
    with pytest.raises(PermanentError, match="cannot be a file of repo"):
        map_change(change("photos", key), MAPPINGS)


def test_map_change_with_no_mappings() -> None:
    assert map_change(change("photos", "a"), []) is None
