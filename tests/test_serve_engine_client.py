"""The front-end's engine client over a real link: every token exactly once and in order (duplicates
dropped, gaps waited for and filled by the record), cancels sent, state seen, and a coordinator that goes
away either comes back (open requests submitted again) or ends every stream and calls on_gone.

The coordinator end is a LinkServer driven by the test, not the coordinator."""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable

import pytest
from serve_stack import INFO

from dejavu_py.comm.local_link import Link, LinkServer
from dejavu_py.protocol.serving import (
    Cancel,
    EngineState,
    Finished,
    Submit,
    Tokens,
)
from dejavu_py.serve.engine_client import LINK_GONE, EngineClient, EngineRequestError


class Coordinator:
    """Accepts links, says ServerInfo, records what it hears; the test sends the rest."""

    def __init__(self) -> None:
        self.links: queue.Queue[Link] = queue.Queue()
        self.heard: queue.Queue = queue.Queue()
        self.refuse = False
        """Close every new link at once, as a coordinator that is gone (its process ended) would."""
        self.server = LinkServer(self._on_link)

    def _on_link(self, link: Link) -> None:
        if self.refuse:
            link.close()
            return
        link.start_reading(self.heard.put, lambda: None, "test-coordinator")
        link.send(INFO)
        self.links.put(link)

    def connect(self, reconnect_s: float, on_gone: Callable[[], None] | None = None) -> tuple[EngineClient, Link]:
        """An engine client connected to this coordinator (it heard ServerInfo first), and its link here."""
        client = EngineClient(self.server.address, reconnect_s=reconnect_s, on_gone=on_gone)
        assert client.open(5) == INFO
        return client, self.links.get(timeout=5)

    def hear(self, kind: type, timeout: float = 5.0):
        deadline = time.monotonic() + timeout
        while True:
            msg = self.heard.get(timeout=max(deadline - time.monotonic(), 0.01))
            if isinstance(msg, kind):
                return msg


@pytest.fixture
def coord():
    c = Coordinator()
    yield c
    c.server.close()


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_tokens_arrive_once_each_in_order(coord):
    async def main():
        client, link = coord.connect(reconnect_s=0)
        stream = client.submit(Submit("r1", [5, 6], max_tokens=6))
        assert coord.hear(Submit).request_id == "r1"
        link.send(Tokens([("r1", 0, [10, 11])], 1.0))
        link.send(Tokens([("r1", 1, [11, 12])], 2.0))  # 11 again (a recovery resent it)
        link.send(Tokens([("r1", 4, [15])], 3.0))  # after a gap: waits for 3
        link.send(Tokens([("r1", 3, [13, 14])], 4.0))  # fills it, one too many: 14 is index 4's place
        link.send(Finished("r1", {"id": "r1", "output_ids": [10, 11, 12, 13, 15, 16], "finish_reason": "length"}))
        got = [b.token_ids async for b in stream]
        assert [t for ids in got for t in ids] == [10, 11, 12, 13, 14, 16]  # index 4 came first as 14; 15 (index 4 again) dropped
        assert stream.record["finish_reason"] == "length"
        assert client.in_flight == 0
        client.close()

    _run(main())


def test_a_record_fills_tokens_never_sent(coord):
    async def main():
        client, link = coord.connect(reconnect_s=0)
        stream = client.submit(Submit("r2", [5], max_tokens=4))
        coord.hear(Submit)
        link.send(Tokens([("r2", 2, [30])], 1.0))  # indices 0 and 1 never come as tokens
        link.send(Finished("r2", {"id": "r2", "output_ids": [7, 8, 30, 31], "finish_reason": "stop"}))
        assert [t async for b in stream for t in b.token_ids] == [7, 8, 30, 31]
        client.close()

    _run(main())


def test_an_error_record_raises_and_cancel_is_sent(coord):
    async def main():
        client, link = coord.connect(reconnect_s=0)
        bad = client.submit(Submit("bad", [5], max_tokens=4))
        link.send(Finished("bad", {"id": "bad", "error": "prompt too long for the cache"}))
        with pytest.raises(EngineRequestError, match="too long"):
            async for _ in bad:
                pass
        client.submit(Submit("gone", [5], max_tokens=4))
        client.cancel("gone", "stop")
        assert coord.hear(Cancel) == Cancel("gone", "stop")
        assert client.in_flight == 0
        client.close()

    _run(main())


def test_engine_state_reaches_listeners(coord):
    async def main():
        client, link = coord.connect(reconnect_s=0)
        seen = []
        client.state_listeners.append(seen.append)
        client.attach(asyncio.get_running_loop())
        assert not client.serving  # nothing said yet
        link.send(EngineState(serving=True, running=3))
        for _ in range(200):
            if client.serving:
                break
            await asyncio.sleep(0.01)
        assert client.serving and seen[-1].running == 3
        client.close()

    _run(main())


def test_a_coordinator_that_comes_back_gets_the_open_requests_again(coord):
    async def main():
        client, first = coord.connect(reconnect_s=5)
        stream = client.submit(Submit("r3", [5], max_tokens=3))
        coord.hear(Submit)
        first.send(Tokens([("r3", 0, [40])], 1.0))
        assert (await stream.__anext__()).token_ids == [40]
        first.close()  # the coordinator drops the link; the client reconnects
        second = await asyncio.to_thread(coord.links.get, True, 5)
        assert (await asyncio.to_thread(coord.hear, Submit)).request_id == "r3"
        second.send(Tokens([("r3", 0, [40, 41])], 2.0))  # started over: 40 again
        second.send(Finished("r3", {"id": "r3", "output_ids": [40, 41, 42], "finish_reason": "length"}))
        assert [t async for b in stream for t in b.token_ids] == [41, 42]
        client.close()

    _run(main())


def test_a_coordinator_gone_for_good_fails_the_streams_and_calls_on_gone(coord):
    gone = threading.Event()

    async def main():
        client, link = coord.connect(reconnect_s=0.2, on_gone=gone.set)
        stream = client.submit(Submit("r4", [5], max_tokens=3))
        coord.hear(Submit)
        coord.refuse = True
        link.close()
        with pytest.raises(EngineRequestError, match=LINK_GONE):
            async for _ in stream:
                pass
        assert client.gone and not client.serving
        with pytest.raises(EngineRequestError):
            client.submit(Submit("r5", [5], max_tokens=3))

    _run(main())
    assert gone.is_set()
