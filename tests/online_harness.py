"""What the online-serving tests share: a stand-in model and stage, and a front-end's end of the link."""
from __future__ import annotations

import queue
import threading
import time

from dejavu_py.comm.local_link import Link, connect
from dejavu_py.protocol.plan import StepPlan, StepResult, Stop
from dejavu_py.protocol.serving import Finished, Tokens

EOS = 2
VOCAB = 64

def token_at(pos: int) -> int:
    """The stand-in model: the token sampled at position ``pos`` (end-of-sequence every 5th one)."""
    return EOS if pos % 5 == 4 else 10 + pos % 40


class PacedStage:
    """A one-stage pipeline answering each plan after ``pace_s``, in order, on a thread of its own."""

    def __init__(self, inbox: queue.Queue, pace_s: float = 0.01) -> None:
        self.inbox, self.pace_s = inbox, pace_s
        self.plans: list[StepPlan] = []
        self._todo: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def send(self, member: str, msg: object) -> None:
        self._todo.put(msg)

    def _run(self) -> None:
        while True:
            msg = self._todo.get()
            if isinstance(msg, Stop):
                self.inbox.put(("s0", msg))
                continue
            time.sleep(self.pace_s)
            self.plans.append(msg)
            tokens = [token_at(start + n) for start, n in zip(msg.start_pos, msg.num_tokens)]
            self.inbox.put(("s0", StepResult(msg.mb, msg.step, list(msg.seq_ids), tokens)))


class Client:
    """A front-end: everything it hears, in order."""

    def __init__(self, address) -> None:
        self.link: Link = connect(address, timeout_s=10)
        self.heard: queue.Queue = queue.Queue()
        self.log: list = []
        self._taken: set[int] = set()  # ends already returned by finished()
        self.link.start_reading(self.heard.put, lambda: None, "test-client")

    def send(self, msg) -> None:
        assert self.link.send(msg)

    def until(self, pred, timeout_s: float = 10.0):
        """Messages heard until one that ``pred`` accepts (returned)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                msg = self.heard.get(timeout=0.05)
            except queue.Empty:
                continue
            self.log.append(msg)
            if pred(msg):
                return msg
        raise AssertionError(f"not heard in {timeout_s}s; heard {self.log[-5:]}")

    def drain(self) -> None:
        """Into the log: everything heard so far."""
        while not self.heard.empty():
            self.log.append(self.heard.get())

    def finished(self, rid: str, timeout_s: float = 30.0) -> Finished:
        """The next end of ``rid`` not asked for before (heard already, or to come)."""
        match = lambda m: isinstance(m, Finished) and m.request_id == rid and id(m) not in self._taken  # noqa: E731
        end = next((m for m in self.log if match(m)), None) or self.until(match, timeout_s)
        self._taken.add(id(end))
        return end

    def streamed(self, rid: str) -> list[tuple[int, list[int]]]:
        """(index, tokens) of every Tokens item for ``rid`` heard so far."""
        return [(i, toks) for m in self.log if isinstance(m, Tokens) for r, i, toks in m.items if r == rid]


def expected(n_prompt: int, max_tokens: int, ignore_eos: bool = False) -> list[int]:
    out = []
    for pos in range(n_prompt, n_prompt + max_tokens):
        out.append(token_at(pos))
        if out[-1] == EOS and not ignore_eos:
            break
    return out


def heard_tokens(c: Client, rid: str) -> list[int]:
    """``rid``'s tokens by index, each index heard the same every time it came (a front-end's view)."""
    tokens: dict[int, int] = {}
    for i, toks in c.streamed(rid):
        for k, t in enumerate(toks):
            assert tokens.setdefault(i + k, t) == t
    assert sorted(tokens) == list(range(len(tokens)))
    return [tokens[i] for i in range(len(tokens))]
