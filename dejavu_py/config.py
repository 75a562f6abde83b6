"""Run configuration: one small dataclass per component, each checked in ``__post_init__``.

Every default of a run is written here, once: the command line (cli.py, flags.py) is generated from
these fields, its help text is each field's docstring (the string after it) and its default the
field's. Workers receive the whole ``RunConfig`` (it is picklable). Errors are ``UserError`` naming
the flag and the value.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from dejavu_py.errors import UserError

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
AutoOnOff = Literal["auto", "on", "off"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
CheckpointPolicy = Literal["all", "interval", "adaptive"]
MoEKernel = Literal["auto", "fused", "grouped", "loop"]
MoEAlign = Literal["kernel", "torch"]


def _positive(flag: str, value: int | float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise UserError(f"{flag} {value}: must be a positive number")


def _choose(flag: str, value: str, choices: object) -> None:
    """``value`` is one of the Literal type ``choices``."""
    names = get_args(choices)
    if value not in names:
        raise UserError(f"{flag} {value!r}: choose {', '.join(names[:-1])} or {names[-1]}")


@dataclass(kw_only=True, slots=True)
class PipelineConfig:
    """How the model is split and where stages run."""

    stages: int | None = None
    """Pipeline stages in the colocated mode; it must equal the process count. None: one per rank process."""
    layers_per_stage: list[int] | None = None
    """Decoder layers of each (token) stage, e.g. 3,5,4. None: a balanced split, the embedding and the head
    counted as layers."""
    prompt_stages: int = 0
    """Stages of a separate prompt (prefill) pipeline, whose KV streams layer by layer to the token stages;
    0: prefill and decode colocated."""
    token_stages: int | None = None
    """Stages of the token (decode) pipeline with --prompt-stages. None: the remaining processes."""
    prompt_layers_per_stage: list[int] | None = None
    """Decoder layers of each prompt stage, e.g. 8,8. None: a balanced split."""
    microbatches: int | None = None
    """Microbatches in flight. None: as many as stages, which keeps every stage busy (with --swap: twice
    --swap-resident)."""
    device: Device = "auto"
    """Where stages run: cpu, cuda, or auto (cuda when a GPU is visible)."""
    dtype: DType = "auto"
    """Weights and compute: float32, bfloat16, float16, or auto (float32 on CPU, bfloat16 on GPU)."""
    threads: int = 1
    """CPU threads per stage worker (intra-op)."""
    cuda_graphs: AutoOnOff = "auto"
    """Decode steps replayed from captured CUDA graphs: auto (on GPU), on, off. 'on' on CPU runs the same
    static-buffer path without capture."""
    async_scheduling: bool = True
    """The decode pipeline gets each microbatch's next plan while the step before is still running; its
    stages send their output as soon as a step is queued and the last hands its sampled ids to the first,
    which launches the next step before that step's tokens reach the host: the host work of a step
    (planning, messages, reading tokens back) overlaps the device's. Not with --swap. Off: one plan in
    flight per microbatch, each stage sends its output once it is computed."""

    def __post_init__(self) -> None:
        _choose("--cuda-graphs", self.cuda_graphs, AutoOnOff)
        _positive("--stages", self.stages, allow_none=True)
        _positive("--token-stages", self.token_stages, allow_none=True)
        if self.prompt_stages < 0:
            raise UserError(f"--prompt-stages {self.prompt_stages}: must be 0 (colocated) or more")
        if self.prompt_stages and self.stages is not None:
            raise UserError("--stages applies to the colocated mode; with --prompt-stages give --token-stages")
        _positive("--microbatches", self.microbatches, allow_none=True)
        _positive("--threads", self.threads)
        _choose("--device", self.device, Device)
        _choose("--dtype", self.dtype, DType)


@dataclass(kw_only=True, slots=True)
class SchedulerConfig:
    """How many sequences and tokens a microbatch step may carry."""

    max_batch_size: int = 32
    """Sequences per microbatch."""
    max_batch_tokens: int = 2048
    """New tokens per step (prompt tokens of prefills plus one per decoding sequence)."""

    def __post_init__(self) -> None:
        _positive("--max-batch-size", self.max_batch_size)
        _positive("--max-batch-tokens", self.max_batch_tokens)


@dataclass(kw_only=True, slots=True)
class CacheConfig:
    """The KV cache each stage keeps for its layers."""

    capacity_tokens: int = 16384
    """KV cache capacity of each stage in tokens (its own layers, all sequences); requests wait until
    theirs fits."""
    block_size: int = 16
    """Tokens per KV cache block."""
    swap: bool = False
    """Microbatch swapping: decode microbatches beyond --swap-resident keep their KV in pinned host memory
    and are swapped in before their turn, so more fit in flight."""
    swap_resident: int = 2
    """With --swap: decode microbatches whose KV the device cache holds at once; each gets
    capacity / resident tokens."""
    max_model_len: int | None = None
    """Longest sequence (prompt + output). None: the model's max_position_embeddings."""

    def __post_init__(self) -> None:
        _positive("--swap-resident", self.swap_resident)
        _positive("--kv-capacity-tokens", self.capacity_tokens)
        _positive("--block-size", self.block_size)
        _positive("--max-model-len", self.max_model_len, allow_none=True)
        if self.capacity_tokens < self.block_size:
            raise UserError(
                f"--kv-capacity-tokens {self.capacity_tokens}: smaller than one block (--block-size {self.block_size})"
            )

    @property
    def num_blocks(self) -> int:
        """Blocks of a stage's device cache."""
        return self.capacity_tokens // self.block_size

    @property
    def partition_blocks(self) -> int:
        """With swap: blocks of one microbatch's partition (device cache / resident partitions)."""
        return self.num_blocks // self.swap_resident if self.swap else self.num_blocks


@dataclass(kw_only=True, slots=True)
class GenerationConfig:
    """Defaults for requests that do not say."""

    max_new_tokens: int = 64
    """New tokens for a request that gives no max_new_tokens."""
    seed: int = 0
    """Run seed: a sampled request without a seed gets one derived from this and its id."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (for benchmarks)."""

    def __post_init__(self) -> None:
        _positive("--max-new-tokens", self.max_new_tokens)
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed {self.seed}: must be in [0, 2**63)")


@dataclass(kw_only=True, slots=True)
class RuntimeConfig:
    """Timeouts, logs, progress and the opt-in device trace."""

    comm_timeout_s: float = 300.0
    """Seconds to wait for a pipeline neighbour's message before the run fails."""
    startup_timeout_s: float = 600.0
    """Seconds for all workers to load their weights and connect."""
    log_level: LogLevel = "INFO"
    """Level of the log files and of rank 0's console."""
    progress: bool = True
    """Progress on rank 0: a bar when stderr is a terminal, else a log line every --progress-interval."""
    progress_interval_s: float = 10.0
    """Seconds between progress log lines when stderr is not a terminal (a pipe or a file, where a bar
    cannot be redrawn in place)."""
    trace_dir: Path | None = None
    """Directory for a device trace of each stage worker's steps (torch.profiler: host calls with shapes
    and stacks, device kernels and copies; DIR/<stage>.json in Chrome trace format), with --trace-steps.
    None: no trace, no cost."""
    trace_steps: tuple[int, int] | None = None
    """The steps a trace covers, FIRST:LAST: from each worker's step FIRST up to step LAST, e.g. 100:120
    (in a --config file a list, [100, 120]: YAML reads 100:20 as a number)."""

    def __post_init__(self) -> None:
        _positive("--comm-timeout", self.comm_timeout_s)
        _positive("--startup-timeout", self.startup_timeout_s)
        _positive("--progress-interval", self.progress_interval_s)
        if self.log_level.upper() not in get_args(LogLevel):
            raise UserError(f"--log-level {self.log_level!r}: choose DEBUG, INFO, WARNING or ERROR")
        if (self.trace_dir is None) != (self.trace_steps is None):
            raise UserError("--trace-dir and --trace-steps go together: give both, e.g. --trace-dir traces --trace-steps 100:120")
        if self.trace_steps is not None and not 0 <= self.trace_steps[0] < self.trace_steps[1]:
            first, last = self.trace_steps
            raise UserError(f"--trace-steps {first}:{last}: FIRST must be 0 or more and less than LAST")


@dataclass(kw_only=True, slots=True)
class KernelConfig:
    """Which kernels a stage's forward runs; each stage resolves 'auto' once, when it loads, for its
    device and dtype (models/kernels.py). The choices give the same results up to float rounding order."""

    moe_kernel: MoEKernel = "auto"
    """Routed experts: fused (Triton kernels), grouped (torch's grouped GEMM), loop (a GEMM pair per
    expert), or auto (fused on CUDA with triton, grouped on CUDA bf16 without it, the loop elsewhere)."""
    moe_align: MoEAlign = "kernel"
    """How the fused MoE kernels group token rows by expert: kernel (one launch) or torch (torch ops)."""
    triton_ops: bool = True
    """Triton kernels for RMSNorm, residual add + norm, rotary with the KV cache write, SwiGLU and decode
    attention where triton runs (CUDA); off: torch's kernels."""
    fuse_projections: bool = True
    """On CUDA, stack q/k/v (and a SwiGLU MLP's gate/up) into one weight after loading: one GEMM instead
    of several."""
    fold_moe: bool = True
    """With --fuse-projections and the fused MoE kernels, fold each MoE block: one routing kernel, and a
    shared expert run as more experts of the fused kernels."""

    def __post_init__(self) -> None:
        _choose("--moe-kernel", self.moe_kernel, MoEKernel)
        _choose("--moe-align", self.moe_align, MoEAlign)


@dataclass(kw_only=True, slots=True)
class FTConfig:
    """Fault tolerance: detection, replacement, KV replicas and token-state checkpoints."""

    enabled: bool = True
    """on: a failed stage is replaced and replays from its peers while the others keep running; off: a
    failure ends the run, and a rerun with the same --run-dir recomputes what was in flight (the baseline)."""
    hang_timeout_s: float = 5.0
    """Seconds without a heartbeat after which a worker counts as hung (e.g. stopped): it is killed and
    replaced."""
    standby: int = 0
    """Warm processes per host (torch imported, device context made) ready to take over a failed stage;
    0: a replacement is spawned on a failure."""
    standby_preload: bool = False
    """Standbys also load a stage's weights ahead of time, so a takeover skips loading."""
    replica_lag: int = 4
    """Steps a token stage may run ahead of its KV replica's acknowledgement, per microbatch; the K/V of
    lag/2 steps travels to the holder as one message."""
    checkpoint_policy: CheckpointPolicy = "all"
    """Which steps keep token-state checkpoints of stage outputs: all, every --checkpoint-interval steps
    (interval), or adaptive (denser when routing entropy or expert load imbalance is high)."""
    checkpoint_interval: int = 4
    """Steps between checkpoints for the interval policy (and the adaptive policy's sparse rate)."""
    max_checkpoints: int = 100
    """Checkpoints kept per microbatch (a ring); older ones are dropped."""
    recovery_timeout_s: float = 120.0
    """Seconds a recovery may take (replacement start, weights, edges, KV, replay) before the run fails."""
    replica_shm_dir: str = "auto"
    """RAM-backed directory for the KV replicas a stage holds: a source and a replacement on the holder's
    host write and read it directly, without a socket. auto: /dev/shm where it exists; off: replicas in
    pinned memory, every byte over the replica edge."""

    @property
    def shm_dir(self) -> str | None:
        """Where replica files go on this host (None: pinned memory)."""
        if self.replica_shm_dir == "off":
            return None
        path = "/dev/shm" if self.replica_shm_dir == "auto" else self.replica_shm_dir
        return path if os.path.isdir(path) and os.access(path, os.W_OK) else None

    def __post_init__(self) -> None:
        _positive("--hang-timeout", self.hang_timeout_s)
        _positive("--replica-lag", self.replica_lag)
        _positive("--checkpoint-interval", self.checkpoint_interval)
        _positive("--max-checkpoints", self.max_checkpoints)
        _positive("--recovery-timeout", self.recovery_timeout_s)
        if self.standby < 0:
            raise UserError(f"--standby {self.standby}: must be 0 or more")
        if self.replica_shm_dir not in ("auto", "off") and not os.path.isdir(self.replica_shm_dir):
            raise UserError(f"--replica-shm-dir {self.replica_shm_dir}: not a directory; give one (tmpfs), auto or off")
        _choose("--checkpoint-policy", self.checkpoint_policy, CheckpointPolicy)
        if self.replica_lag > self.max_checkpoints:
            raise UserError(
                f"--replica-lag {self.replica_lag} exceeds --max-checkpoints {self.max_checkpoints}: steps the "
                "replica has not acknowledged must still have checkpoints to replay from"
            )


@dataclass(kw_only=True, slots=True)
class ServeConfig:
    """Online serving: rank 0 starts an HTTP front-end process (an OpenAI-compatible server) and the
    coordinator serves the requests it forwards, instead of a request file's."""

    enabled: bool = False
    """Serve clients over HTTP until stopped (SIGTERM or SIGINT to rank 0) instead of reading a request
    file; the serve subcommand sets it."""
    host: str = "127.0.0.1"
    """Address the HTTP server listens on (0.0.0.0: every interface)."""
    port: int = 8000
    """TCP port the HTTP server listens on."""
    served_model_name: str | None = None
    """The model's name in the API (what clients put in "model"). None: the checkpoint directory's name."""
    max_waiting: int = 1024
    """Requests in flight beyond which the HTTP server answers a new one 429 (retry later), and waiting for
    a place in a batch beyond which the coordinator refuses one: a bounded queue, not an unbounded wait."""
    frontend_module: str = "dejavu_py.serve"
    """Python module rank 0 runs as the front-end process (python -m MODULE --link HOST:PORT --host ...
    --port ... --checkpoint ..., the link's key in its environment): any front-end that speaks
    protocol/serving.py may take the HTTP server's place."""
    stream_flush_s: float = 0.0002
    """Seconds the token sender waits after a new token before sending, so that one message carries a
    step's tokens of every request instead of one message each."""
    state_interval_s: float = 0.25
    """Seconds between two engine states (health, load, fault-tolerance counters) sent to the front-end;
    a change of health is sent at once."""
    frontend_stop_timeout_s: float = 10.0
    """Seconds the front-end process has to exit once serving is over before it is killed."""
    history: int = 10_000
    """Latest steps whose loop times (coordinator and stages: summary.json's medians, timeline's step_ms)
    and latest progress samples (the timeline's) a server keeps, so that its memory stays bounded while it
    runs; means and counts still cover every step. A batch run keeps them all."""

    def kept_history(self) -> int | None:
        """How many steps and samples a run keeps: ``history`` when serving, None (all) for a batch run."""
        return self.history if self.enabled else None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise UserError(f"--port {self.port}: must be a TCP port, 1 to 65535")
        _positive("--max-waiting", self.max_waiting)
        _positive("--stream-flush", self.stream_flush_s)
        _positive("--state-interval", self.state_interval_s)
        _positive("--frontend-stop-timeout", self.frontend_stop_timeout_s)
        _positive("ServeConfig.history", self.history)
        if not self.frontend_module:
            raise UserError("--frontend-module is empty: give a module name, e.g. dejavu_py.serve")


def _new_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Everything a run needs; built once by the CLI and handed to every process."""

    model: Path
    """Checkpoint directory: config.json + safetensors (+ tokenizer.json)."""
    prompts: Path | None = None
    """Request file, JSONL: one {id, input_ids|prompt, max_new_tokens, ...} per line; none when serving
    online (``serve``)."""
    output: Path | None = None
    """Output JSONL, one line per request in input order. None: RUN_DIR/outputs.jsonl."""
    run_dir: Path = field(default_factory=_new_run_dir)
    """Directory for logs, workers.json and state; by default runs/<date-time>."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    ft: FTConfig = field(default_factory=FTConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        if self.prompts is None and not self.serve.enabled:
            raise UserError("--prompts is required: give the request file (JSONL), or serve online instead")
        if self.output is None:
            self.output = self.run_dir / "outputs.jsonl"

    @property
    def swap_partitions(self) -> int:
        """With swap: decode microbatches, each with its own KV partition (default twice the resident ones)."""
        return self.pipeline.microbatches or 2 * self.cache.swap_resident

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def workers_file(self) -> Path:
        return self.run_dir / "workers.json"
