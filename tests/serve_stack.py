"""A front-end served by uvicorn in a thread over a scripted coordinator, for the HTTP-layer tests of
serve/ (tests/test_serve_*.py).

The coordinator end of the link is a small LinkServer that answers ServerInfo, EngineState and, for each
Submit, Tokens and a Finished record from a script (the model's output is whatever the script says): the
tests that use it test the HTTP layer only; the real pipeline behind the server is tested elsewhere.
"""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from make_checkpoint import build_tokenizer

from dejavu_py.comm.local_link import Link, LinkServer
from dejavu_py.protocol.serving import (
    Cancel,
    EngineState,
    Finished,
    ServerInfo,
    Submit,
    Tokens,
)
from dejavu_py.serve.app import build_app
from dejavu_py.serve.context import ServeContext
from dejavu_py.serve.engine_client import EngineClient
from dejavu_py.serve.params import SamplingDefaults
from dejavu_py.serve.settings import FrontEndConfig
from dejavu_py.tokenizer import Tokenizer, load_tokenizer

INFO = ServerInfo(model="tiny-moe", vocab_size=384, max_model_len=64, max_prompt_tokens=40, eos_token_ids=(2,),
                  default_max_tokens=12, run_seed=3)
REPLY = " the quick brown fox jumps over the lazy dog. When a worker fails, the runtime replaces it."
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
SERVING = EngineState(serving=True)


@dataclass
class Script:
    """What the scripted coordinator answers to one Submit."""

    output: list[int]
    finish_reason: str = "length"
    delay_s: float = 0.0
    """Between two token messages."""
    error: str | None = None


class ScriptedCoordinator:
    """The coordinator's end of the link, answering from ``plan(submit) -> Script``; records all it hears."""

    def __init__(self, tok: Tokenizer, state: EngineState = SERVING) -> None:
        self.tok = tok
        self.state = state
        self.heard: list = []
        self.cond = threading.Condition()
        self.link: Link | None = None
        self.refuse = False
        self.plan: Callable[[Submit], Script] = self.default_plan
        self.server = LinkServer(self._on_link)

    def default_plan(self, submit: Submit) -> Script:
        out = self.tok.encode(REPLY)
        return Script(out[: submit.max_tokens], "length" if len(out) > submit.max_tokens else "stop")

    def _on_link(self, link: Link) -> None:
        if self.refuse:
            link.close()
            return
        self.link = link
        link.start_reading(self._on_msg, lambda: None, "scripted-coordinator")
        link.send(INFO)
        link.send(self.state)

    def _on_msg(self, msg) -> None:
        with self.cond:
            self.heard.append(msg)
            self.cond.notify_all()
        if isinstance(msg, Submit):
            threading.Thread(target=self._answer, args=(msg, self.link), daemon=True).start()

    def cancelled(self, rid: str) -> Cancel | None:
        with self.cond:
            return next((m for m in self.heard if isinstance(m, Cancel) and m.request_id == rid), None)

    def _answer(self, submit: Submit, link: Link) -> None:
        script = self.plan(submit)
        rid = submit.request_id
        if script.error is not None:
            link.send(Finished(rid, {"id": rid, "error": script.error}))
            return
        for i, t in enumerate(script.output):
            if self.cancelled(rid):
                return
            link.send(Tokens([(rid, i, [t])], time.time()))
            time.sleep(script.delay_s)
        record = {"line": None, "id": rid, "output_ids": script.output, "text": self.tok.decode(script.output),
                  "finish_reason": script.finish_reason, "num_prompt_tokens": len(submit.prompt_ids),
                  "timings": {"queued_s": 0.01, "first_token_s": 0.02, "total_s": 0.05}}
        link.send(Finished(rid, record))

    def send(self, msg) -> None:
        assert self.link is not None and self.link.send(msg)

    def wait_for(self, pred: Callable[[object], bool], timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                hit = next((m for m in self.heard if pred(m)), None)
                if hit is not None or not self.cond.wait(max(deadline - time.monotonic(), 0)):
                    if hit is None:
                        hit = next((m for m in self.heard if pred(m)), None)
                    return hit

    def submits(self) -> list[Submit]:
        with self.cond:
            return [m for m in self.heard if isinstance(m, Submit)]


class ServerThread:
    """uvicorn serving ``app`` on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", loop="auto"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)



def make_ckpt(root: Path) -> Path:
    """A checkpoint directory with the tiny checkpoints' tokenizer (no chat template) and nothing else."""
    out = Path(root) / "tiny-moe"
    out.mkdir()
    build_tokenizer(types.SimpleNamespace(vocab_size=INFO.vocab_size), out)
    return out


def make_chat_ckpt(ckpt: Path, root: Path) -> Path:
    """A copy of ``ckpt`` whose tokenizer_config.json has a chat template."""
    out = Path(root) / "tiny-chat"
    shutil.copytree(ckpt, out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    return out


def load_tok(ckpt: Path) -> Tokenizer:
    t = load_tokenizer(ckpt)
    assert t is not None
    return t


@contextmanager
def running(ckpt: Path, tok: Tokenizer, config: FrontEndConfig | None = None) -> Iterator[types.SimpleNamespace]:
    """A scripted coordinator, an engine client linked to it, and the app served on a free port."""
    coord = ScriptedCoordinator(tok)
    engine = EngineClient(coord.server.address, reconnect_s=0)
    engine.open(10)
    ctx = ServeContext(engine, tok, engine.info, config or FrontEndConfig(max_waiting=8), ckpt,
                       SamplingDefaults(temperature=0.0))
    server = ServerThread(build_app(ctx))
    client = httpx.Client(base_url=server.url, timeout=30)
    try:
        wait(lambda: engine.serving)
        yield types.SimpleNamespace(coord=coord, ctx=ctx, client=client, url=server.url)
    finally:
        client.close()
        server.stop()
        engine.close()
        coord.server.close()


def wait(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def api_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    return err


def sse_events(r: httpx.Response) -> list:
    """The events of an SSE body: every line is 'data: ...' followed by a blank line; JSON, then [DONE]."""
    assert r.headers["content-type"].startswith("text/event-stream")
    text = r.text
    assert text.endswith("data: [DONE]\n\n")
    frames = text.split("\n\n")[:-1]
    assert all(f.startswith("data: ") and "\n" not in f for f in frames), frames
    return [json.loads(f[6:]) for f in frames[:-1]]

