"""A record's history (datumflow.broker.kv.Records.history), as `inspect datum` reads an older
pipeline version's spec: the values the bucket keeps, oldest first, through datumflow's errors."""

from __future__ import annotations

import pytest
from nats.js.api import KeyValueConfig

from datumflow.broker.connection import Broker
from datumflow.broker.kv import Records
from datumflow.broker.records import JobHead
from datumflow.errors import BrokerNotFound

pytestmark = pytest.mark.asyncio


async def test_a_history_is_the_kept_values_oldest_first(broker: Broker) -> None:
    await broker.js.create_key_value(KeyValueConfig(bucket="kept", history=3))
    records = Records(broker, bucket="kept", type=JobHead)
    assert await records.history("p") == []
    for job in ("j1", "j2", "j3", "j4"):
        await records.put("p", JobHead(pipeline="p", last_job=job))
    assert [head.last_job for head in await records.history("p")] == ["j2", "j3", "j4"]
    await records.delete("p")
    assert [head.last_job for head in await records.history("p")] == ["j3", "j4"]
    with pytest.raises(BrokerNotFound, match="no_bucket"):
        await Records(broker, bucket="no_bucket", type=JobHead).history("p")
