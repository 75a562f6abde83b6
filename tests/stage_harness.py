"""A stage worker in the test's own process, on CPU, with a tiny model: its loop driven through its
inbox, what it sends recorded by stand-in edges (no peers, no threads of ours)."""
from __future__ import annotations

import inspect
import threading
from pathlib import Path

import torch

from dejavu_py import cli
from dejavu_py.comm.store import StoreAddress, connect, free_port
from dejavu_py.models.config import load_model_config
from dejavu_py.protocol.layout import COORD, build_layout
from dejavu_py.protocol.plan import SeqState, StepPlan
from dejavu_py.stage.loop import Worker
from dejavu_py.stage.stage_load import load_runner
from dejavu_py.stage.worker import WorkerSpec

BLOCK = 8
PROMPT = [5, 9, 11, 3, 7]


class RecordingEdge:
    """An edge that keeps what is sent on it, in one log shared by all of a worker's edges."""

    def __init__(self, peer: str, log: list) -> None:
        self.peer, self.log, self.closed, self.generation = peer, log, False, 0

    def send(self, msg, tensor=None, fast=False, ring=None) -> None:
        self.log.append((self.peer, msg, tensor))

    def reserve(self, nbytes: int) -> None:
        return None  # no shared GPU: the tensor goes with the message

    def flush(self) -> None:
        pass

    def release(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def make_worker(ckpt: Path, run_dir: Path, name: str = "s1", stages: int = 2, generation: int = 0,
                flags: tuple[str, ...] = ()) -> tuple[Worker, list]:
    """Worker ``name`` of a ``stages``-stage pipeline, its edges to its peers and the coordinator
    recording into the list returned with it."""
    args = ["--model", str(ckpt), "--prompts", str(run_dir / "none.jsonl"), "--stages", str(stages),
            "--device", "cpu", "--dtype", "float32", "--block-size", str(BLOCK), "--kv-capacity-tokens", "256",
            "--max-batch-size", "4", "--max-batch-tokens", "64", "--replica-shm-dir", "off",
            "--run-dir", str(run_dir), *flags]
    cfg, _ = cli.parse(args)
    layout = build_layout(cfg, load_model_config(ckpt).num_layers, stages)
    address = StoreAddress("127.0.0.1", free_port(), "test/", 30.0)
    store = connect(address, host_server=True)
    spec = WorkerSpec(layout.by_name(name), layout, cfg, address, rank=0, local_rank=0, generation=generation)
    runner, _ = load_runner(spec, torch.device("cpu"))
    worker = Worker(spec, store, runner, torch.device("cpu"))
    log: list = []
    for peer in [*layout.peers_of(name), COORD]:
        worker.edges[peer] = RecordingEdge(peer, log)
    return worker, log


def prefill(step: int = 0, seq: int = 0) -> StepPlan:
    """A prompt's step; on its first stage the tokens, later stages take activations."""
    return StepPlan(0, step, [seq], [0], [len(PROMPT)], list(PROMPT), [True],
                    new_seqs={seq: SeqState(list(range(4)), 0.0, 1.0, 0, 0)})


def decode(step: int, seq: int = 0, replay_until: str | None = None) -> StepPlan:
    """The next token's step after ``prefill`` (``step`` - 1 decode steps after it)."""
    return StepPlan(0, step, [seq], [len(PROMPT) + step - 1], [1], [3], [True], replay_until=replay_until)


def activations(worker: Worker, plan: StepPlan) -> torch.Tensor | None:
    """What the stage before sends with ``plan`` (None for the first stage: it embeds the tokens)."""
    if worker.me.stage.has_embed:
        return None
    g = torch.Generator().manual_seed(plan.step)
    return torch.randn(plan.total_tokens, worker.runner.model.cfg.hidden_size, generator=g)


def put(worker: Worker, plan: StepPlan, peer: str | None = None) -> None:
    worker.inbox.put((peer or worker.me.prev, plan, activations(worker, plan)))


def serve_in_thread(worker: Worker) -> tuple[threading.Thread, list]:
    """Serve on a thread of its own (the test feeds the inbox meanwhile); the list gets serve's result."""
    result: list = []
    t = threading.Thread(target=lambda: result.append(worker.serve()), daemon=True)
    t.start()
    return t, result


def sent(log: list, kind: type) -> list:
    return [(peer, msg) for peer, msg, _ in log if isinstance(msg, kind)]


def port_members(port: type) -> set[str]:
    """The attributes and methods a port (a ``typing.Protocol``) names, its bases' included."""
    names: set[str] = set()
    for cls in port.__mro__:
        if cls.__module__.startswith("dejavu_py."):
            names |= set(inspect.get_annotations(cls))
            names |= {n for n, v in vars(cls).items() if inspect.isfunction(v) and not n.startswith("_")}
    return names
