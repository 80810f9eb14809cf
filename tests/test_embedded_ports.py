"""The ports the embedded broker (and every test's nats-server) listens on: free, and outside the
kernel's ephemeral range, so that a server restarted on its port finds it free. A port of that
range may meanwhile become the local port of an outgoing connection: a test's cluster node once
failed to restart so ("bind: address already in use")."""

from __future__ import annotations

import socket

from datumflow.runtime.embedded import EPHEMERAL_RANGE, free_port


def test_a_brokers_port_is_free_and_not_one_an_outgoing_connection_can_be_given() -> None:
    low, _ = (int(n) for n in EPHEMERAL_RANGE.read_text().split())
    ports = [free_port() for _ in range(50)]
    assert all(1024 <= port < low for port in ports), ports
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # nothing listens there


def test_an_outgoing_connection_is_given_a_port_of_the_range() -> None:
    # What the test above relies on: the kernel takes a connection's local port from the range.
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", free_port()))
        server.listen()
        client.connect(server.getsockname())
        low, high = (int(n) for n in EPHEMERAL_RANGE.read_text().split())
        assert low <= client.getsockname()[1] <= high
