"""Command line: flags, YAML defaults, and what each process does.

    torchrun --nproc-per-node 3 -m dejavu_py --config configs/tiny-cpu.yaml \\
        --model CKPT_DIR --prompts requests.jsonl --output out.jsonl --run-dir runs/x

``python -m dejavu_py --nproc-per-node 3 ...`` does the same without torchrun on the command line: it
checks the inputs first (a user mistake is one line, never a traceback) and then starts the ranks
with torch's elastic launcher. Every YAML key is a flag name (``max_batch_size: 8``); flags win.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import yaml

from dejavu_py.config import (
    CacheConfig,
    FTConfig,
    GenerationConfig,
    PipelineConfig,
    RunConfig,
    RuntimeConfig,
    SchedulerConfig,
)
from dejavu_py.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        raise UserError(f"{message} (see --help)")


def _int_list(text: str) -> list[int]:
    from dejavu_py.protocol.split import parse_layers_per_stage

    return parse_layers_per_stage(text)


def _bool(text: str) -> bool:
    if str(text).lower() in ("1", "true", "yes", "on"):
        return True
    if str(text).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> _Parser:
    p = _Parser(
        prog="python -m dejavu_py",
        description="Serve a Mixture-of-Experts checkpoint with a pipeline of stages, one process per stage.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML file of defaults for any flag below (keys are flag names)")
    io = p.add_argument_group("input and output")
    io.add_argument("--model", type=Path, help="checkpoint directory: config.json + safetensors (+ tokenizer.json)")
    io.add_argument("--prompts", type=Path, help="request file, JSONL: {id, input_ids|prompt, max_new_tokens, ...}")
    io.add_argument("--output", type=Path, help="output JSONL, one line per request in input order (default RUN_DIR/outputs.jsonl)")
    io.add_argument("--run-dir", type=Path, help="directory for logs, workers.json and state (default runs/<time>)")
    pl = p.add_argument_group("pipeline")
    pl.add_argument("--stages", type=int, help="pipeline stages (default: one per process; must equal the process count)")
    pl.add_argument("--layers-per-stage", type=_int_list, help="decoder layers per stage, e.g. 3,5,4 (default: balanced, embedding and head counted as layers)")
    pl.add_argument("--prompt-stages", type=int, help="stages of a separate prompt (prefill) pipeline; their KV streams layer by layer to the token stages (default 0: prefill and decode colocated)")
    pl.add_argument("--token-stages", type=int, help="stages of the token (decode) pipeline with --prompt-stages (default: the remaining processes)")
    pl.add_argument("--prompt-layers-per-stage", type=_int_list, help="decoder layers per prompt stage, e.g. 8,8 (default: balanced)")
    pl.add_argument("--microbatches", type=int, help="microbatches in flight (default: the number of stages)")
    pl.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where stages run (default auto: cuda when visible)")
    pl.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="weights and compute (default auto: float32 on CPU, bfloat16 on GPU)")
    pl.add_argument("--threads", type=int, help="CPU threads per stage worker (default 1)")
    pl.add_argument("--cuda-graphs", choices=["auto", "on", "off"], help="decode steps replayed from CUDA graphs (default auto: on GPU; 'on' on CPU runs the same static-buffer path uncaptured)")
    pl.add_argument("--async-scheduling", type=_bool, help="plan each microbatch's next step while the last one runs; stages send their output as soon as a step is queued and the last stage hands its sampled ids to the first, so the next step is launched before the last one's tokens reach the host (default true; not with --swap)")
    bc = p.add_argument_group("batching and KV cache")
    bc.add_argument("--max-batch-size", type=int, help="sequences per microbatch (default 32)")
    bc.add_argument("--max-batch-tokens", type=int, help="new tokens per step, prompts included (default 2048)")
    bc.add_argument("--kv-capacity-tokens", type=int, help="KV cache capacity of each stage in tokens (default 16384); requests wait until theirs fits")
    bc.add_argument("--block-size", type=int, help="tokens per KV cache block (default 16)")
    bc.add_argument("--swap", type=_bool, nargs="?", const=True, help="microbatch swapping: decode microbatches beyond --swap-resident keep their KV in pinned host memory and are swapped in before their turn, so more fit in flight (default false)")
    bc.add_argument("--swap-resident", type=int, help="with --swap: microbatches whose KV the device cache holds at once, each getting capacity/resident tokens (default 2)")
    bc.add_argument("--max-model-len", type=int, help="longest prompt + output (default: the model's max_position_embeddings)")
    ge = p.add_argument_group("generation defaults")
    ge.add_argument("--max-new-tokens", type=int, help="for requests that give none (default 64)")
    ge.add_argument("--seed", type=int, help="run seed; a sampled request without a seed gets one derived from this and its id (default 0)")
    ge.add_argument("--ignore-eos", type=_bool, nargs="?", const=True, help="keep generating past end-of-sequence tokens (default false)")
    rt = p.add_argument_group("runtime")
    rt.add_argument("--comm-timeout", type=float, help="seconds to wait for a pipeline neighbour before failing (default 300)")
    rt.add_argument("--startup-timeout", type=float, help="seconds for all workers to load and connect (default 600)")
    rt.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log files and rank 0 console (default INFO)")
    rt.add_argument("--progress", type=_bool, nargs="?", const=True, help="progress bar on rank 0 when stderr is a terminal (default true)")
    ft = p.add_argument_group("fault tolerance")
    ft.add_argument("--ft", choices=["on", "off"], help="on: a failed stage is replaced and replays from its peers while the others keep running; off: a failure ends the run and a rerun with the same --run-dir recomputes what was in flight (default on)")
    ft.add_argument("--hang-timeout", type=float, help="seconds without a heartbeat after which a worker counts as hung and is replaced (default 5)")
    ft.add_argument("--standby", type=int, help="warm processes per host ready to take over a failed stage (default 0: spawn one)")
    ft.add_argument("--standby-preload", type=_bool, nargs="?", const=True, help="standbys load a stage's weights ahead of time (default false)")
    ft.add_argument("--replica-lag", type=int, help="steps a stage may run ahead of its KV replica's acknowledgement; the K/V of lag/2 steps travels to the holder as one message (default 4)")
    ft.add_argument("--checkpoint-policy", choices=["all", "interval", "adaptive"], help="which steps keep token-state checkpoints (default all)")
    ft.add_argument("--checkpoint-interval", type=int, help="steps between checkpoints for the interval policy (default 4)")
    ft.add_argument("--max-checkpoints", type=int, help="checkpoints kept per microbatch, a ring (default 100)")
    ft.add_argument("--recovery-timeout", type=float, help="seconds a recovery may take before the run fails (default 120)")
    ft.add_argument("--replica-shm-dir", help="RAM-backed directory for KV replicas, written and read directly by stages on the same host (default auto: /dev/shm where it exists; off: pinned memory, bytes over the replica edge)")
    la = p.add_argument_group("launching without torchrun")
    la.add_argument("--nproc-per-node", type=int, help="start this many rank processes here (what torchrun --nproc-per-node does)")
    return p


def _yaml_defaults(parser: _Parser, path: Path) -> dict[str, Any]:
    """Flag defaults from a YAML mapping; each value goes through the flag's own type check."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"--config {path}: cannot read YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    out: dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise UserError(f"{path}: unknown key {key!r}; known keys: {', '.join(sorted(actions))}")
        out[dest] = _convert(path, key, value, actions[dest])
    return out


def _convert(path: Path, key: str, value: Any, action: argparse.Action) -> Any:
    if value is None:
        return None
    try:
        if isinstance(value, list) and action.type is _int_list:
            value = ",".join(str(v) for v in value)
        v = action.type(str(value)) if action.type is not None else value
    except (ValueError, TypeError, argparse.ArgumentTypeError, UserError):
        raise UserError(f"{path}: key {key!r}: invalid value {value!r}") from None
    if action.choices is not None and v not in action.choices:
        raise UserError(f"{path}: key {key!r}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return v


def _pick(ns: argparse.Namespace, name: str, default: Any) -> Any:
    v = getattr(ns, name)
    return default if v is None else v


def parse(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    """Flags (over YAML defaults) -> RunConfig; raises UserError naming the flag or key."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    first, _ = pre.parse_known_args(argv)
    if first.config is not None:
        parser.set_defaults(**_yaml_defaults(parser, first.config))
    ns = parser.parse_args(argv)
    for flag in ("model", "prompts"):
        if getattr(ns, flag) is None:
            raise UserError(f"--{flag} is required (or set '{flag}:' in the --config file)")
    run_dir = ns.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    cfg = RunConfig(
        model=ns.model,
        prompts=ns.prompts,
        run_dir=run_dir,
        output=ns.output,
        pipeline=PipelineConfig(
            stages=ns.stages,
            layers_per_stage=ns.layers_per_stage,
            prompt_stages=_pick(ns, "prompt_stages", 0),
            token_stages=ns.token_stages,
            prompt_layers_per_stage=ns.prompt_layers_per_stage,
            microbatches=ns.microbatches,
            device=_pick(ns, "device", "auto"),
            dtype=_pick(ns, "dtype", "auto"),
            threads=_pick(ns, "threads", 1),
            cuda_graphs=_pick(ns, "cuda_graphs", "auto"),
            async_scheduling=_pick(ns, "async_scheduling", True),
        ),
        scheduler=SchedulerConfig(
            max_batch_size=_pick(ns, "max_batch_size", 32), max_batch_tokens=_pick(ns, "max_batch_tokens", 2048)
        ),
        cache=CacheConfig(
            capacity_tokens=_pick(ns, "kv_capacity_tokens", 16384),
            block_size=_pick(ns, "block_size", 16),
            max_model_len=ns.max_model_len,
            swap=_pick(ns, "swap", False),
            swap_resident=_pick(ns, "swap_resident", 2),
        ),
        generation=GenerationConfig(
            max_new_tokens=_pick(ns, "max_new_tokens", 64),
            seed=_pick(ns, "seed", 0),
            ignore_eos=_pick(ns, "ignore_eos", False),
        ),
        runtime=RuntimeConfig(
            comm_timeout_s=_pick(ns, "comm_timeout", 300.0),
            startup_timeout_s=_pick(ns, "startup_timeout", 600.0),
            log_level=_pick(ns, "log_level", "INFO"),
            progress=_pick(ns, "progress", True),
        ),
        ft=FTConfig(
            enabled=_pick(ns, "ft", "on") == "on",
            hang_timeout_s=_pick(ns, "hang_timeout", 5.0),
            standby=_pick(ns, "standby", 0),
            standby_preload=_pick(ns, "standby_preload", False),
            replica_lag=_pick(ns, "replica_lag", 4),
            checkpoint_policy=_pick(ns, "checkpoint_policy", "all"),
            checkpoint_interval=_pick(ns, "checkpoint_interval", 4),
            max_checkpoints=_pick(ns, "max_checkpoints", 100),
            recovery_timeout_s=_pick(ns, "recovery_timeout", 120.0),
            replica_shm_dir=_pick(ns, "replica_shm_dir", "auto"),
        ),
    )
    return cfg, ns


def main(argv: list[str] | None = None) -> int:
    from dejavu_py.comm.store import RankInfo

    info = RankInfo.from_env()
    try:
        cfg, ns = parse(argv)
        if info.launcher == "single" and ns.nproc_per_node and ns.nproc_per_node > 1:
            from dejavu_py.runtime.launch import launch_local

            return launch_local(cfg, ns.nproc_per_node, sys.argv[1:] if argv is None else argv)
        if ns.nproc_per_node and info.launcher != "single" and ns.nproc_per_node != info.world_size:
            raise UserError(f"--nproc-per-node {ns.nproc_per_node}: the launcher started {info.world_size} processes")
        from dejavu_py.runtime.rank import run_rank

        code = run_rank(cfg, info, lambda e: print(f"error: {e}", file=sys.stderr, flush=True))
        # A rank process ends here, without running C++ static destructors: threads of the
        # communication libraries may still be parked in their calls, and tearing those objects
        # down under them aborts the process ("terminate called without an active exception").
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    except UserError as e:
        if info.rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
