"""`delivered` and `waiting_after`: the delivery count and the messages left, read from a
JetStream reply subject as nats-py reads them."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from datumflow.broker.settle import delivered, waiting_after


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.DATUMS.w-noop.3.1207.1199.1765080000000000000.42",
        "$JS.ACK._.ACCHASH.DATUMS.w-noop.5.1207.1199.1765080000000000000.0",
        "$JS.ACK.dom.ACCHASH.DATUMS.w-noop.1.7.7.1765080000000000000.9.r4nd0m",
    ],
)
def test_delivered_agrees_with_nats_py(reply: str) -> None:
    msg = Msg(_client=None, subject="df.datum.p", reply=reply)  # type: ignore[arg-type]
    assert delivered(msg) == msg.metadata.num_delivered
    assert waiting_after(msg) == msg.metadata.num_pending


def test_a_message_not_from_a_stream_is_refused() -> None:
    msg = Msg(_client=None, subject="df.datum.p", reply="_INBOX.abc")  # type: ignore[arg-type]
    with pytest.raises(NotJSMessageError):
        delivered(msg)
    assert waiting_after(msg) is None
