"""The front-end link: messages both ways, a wrong key refused, each end told when the other goes."""
from __future__ import annotations

import queue

import pytest

from dejavu_py.comm.local_link import LinkAddress, LinkServer, connect


def _echo_server(got: queue.Queue) -> LinkServer:
    def on_link(link):
        link.start_reading(lambda m: (got.put(m), link.send(("echo", m))), lambda: got.put("closed"), "test-server")

    return LinkServer(on_link)


def test_messages_both_ways_and_ends_seen():
    got, back = queue.Queue(), queue.Queue()
    server = _echo_server(got)
    client = connect(server.address, timeout_s=5)
    client.start_reading(back.put, lambda: back.put("closed"), "test-client")
    assert client.send({"n": 1})
    assert got.get(timeout=5) == {"n": 1}
    assert back.get(timeout=5) == ("echo", {"n": 1})
    client.close()
    assert got.get(timeout=5) == "closed"
    assert back.get(timeout=5) == "closed"
    assert not client.send("late")
    server.close()


def test_a_wrong_key_is_refused():
    got = queue.Queue()
    server = _echo_server(got)
    bad = LinkAddress(server.address.host, server.address.port, "00" * 16)
    with pytest.raises(Exception):
        connect(bad, timeout_s=2).send("x")
    assert got.empty()
    server.close()


def test_the_key_stays_out_of_the_address_text():
    server = _echo_server(queue.Queue())
    assert server.address.key_hex not in str(server.address)
    server.close()
