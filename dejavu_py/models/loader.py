"""Load one pipeline stage's weights from a Hugging Face safetensors checkpoint.

The stage model is built on the meta device; only the tensors it owns are read (memory-mapped, each
file opened at most once), converted to the wanted dtype, per-expert tensors stacked into the fused
``gate_up_proj`` [E, 2F, D] / ``down_proj`` [E, D, F] form, and assigned with ``load_state_dict``.
Every failure is a one-line :class:`CheckpointError` naming the file and the tensor.
"""
from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dejavu_py import log
from dejavu_py.config import KernelConfig
from dejavu_py.errors import CheckpointError
from dejavu_py.models import kernels as kernel_choice
from dejavu_py.models.config import ModelConfig, load_model_config
from dejavu_py.models.fuse import fuse_projections
from dejavu_py.models.model import StageModel
from dejavu_py.protocol.split import StageSpec

_log = log.get(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Piece:
    """One file tensor and where it goes in the stage's state dict."""

    key: str
    """Tensor name in the checkpoint file."""
    param: str
    """Parameter name in the StageModel."""
    index: tuple[Any, ...] = ()
    """Part of the parameter it fills (``()`` = all of it; ``(e, slice(0, F))`` = expert e's gate rows)."""


class CheckpointFiles:
    """Which file holds each tensor (``model.safetensors`` or the shards of the index), opened lazily, once."""

    def __init__(self, ckpt_dir: Path) -> None:
        self.dir = Path(ckpt_dir)
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        index = self.dir / INDEX_FILE
        if index.is_file():
            self.source = index
            self.file_of = _read_index(index)
        elif (self.dir / SINGLE_FILE).is_file():
            self.source = self.dir / SINGLE_FILE
            self.file_of = {k: SINGLE_FILE for k in self.open(SINGLE_FILE).keys()}
        else:
            raise CheckpointError(_no_weights_message(self.dir))

    def __enter__(self) -> CheckpointFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def has(self, key: str) -> bool:
        return key in self.file_of

    def open(self, name: str, for_key: str | None = None) -> Any:
        """The safetensors handle of a file of the checkpoint (opened on first use)."""
        if name not in self._handles:
            path = self.dir / name
            need = f" (needed for tensor '{for_key}')" if for_key else ""
            if not path.is_file():
                raise CheckpointError(f"{self.source}: names shard {name}{need}, but {path} does not exist")
            try:
                self._handles[name] = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for bad files
                raise CheckpointError(f"{path}: not a readable safetensors file{need}: {e}") from None
        return self._handles[name]

    def missing(self, key: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: missing tensor '{key}'")


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: invalid JSON ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: no 'weight_map' object of tensor name -> shard file")
    return weight_map


def _no_weights_message(ckpt_dir: Path) -> str:
    others = sorted(p.name for p in ckpt_dir.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".safetensors", ".gguf"))
    found = f" (found {', '.join(others[:4])}; convert them to safetensors)" if others else ""
    return f"{ckpt_dir}: no {SINGLE_FILE} or {INDEX_FILE}{found}"


def _first_present(files: CheckpointFiles, candidates: list[str]) -> str:
    for key in candidates:
        if files.has(key):
            return key
    raise files.missing(candidates[0])


def _expert_pieces(files: CheckpointFiles, cfg: ModelConfig, param: str) -> list[Piece]:
    """Fused file tensor if the checkpoint has it, else one piece per expert and projection."""
    prefix, kind = param.rsplit(".mlp.experts.", 1)  # "model.layers.3", "gate_up_proj" | "down_proj"
    moe_prefixes = ["mlp", "block_sparse_moe"] if cfg.model_type == "mixtral" else ["mlp"]
    for p in moe_prefixes:
        if files.has(f"{prefix}.{p}.experts.{kind}"):
            return [Piece(f"{prefix}.{p}.experts.{kind}", param)]
    F = cfg.moe_intermediate_size
    pieces = []
    for e in range(cfg.num_experts):
        if cfg.model_type == "mixtral":
            base = f"{prefix}.block_sparse_moe.experts.{e}"
            gate, up, down = f"{base}.w1.weight", f"{base}.w3.weight", f"{base}.w2.weight"
        else:
            base = f"{prefix}.mlp.experts.{e}"
            gate, up, down = f"{base}.gate_proj.weight", f"{base}.up_proj.weight", f"{base}.down_proj.weight"
        if kind == "gate_up_proj":
            pieces += [Piece(gate, param, (e, slice(0, F))), Piece(up, param, (e, slice(F, 2 * F)))]
        else:
            pieces.append(Piece(down, param, (e,)))
    return pieces


def plan_stage(files: CheckpointFiles, cfg: ModelConfig, params: list[str]) -> list[Piece]:
    """The file tensors that fill the given parameters; raises if one is missing."""
    pieces: list[Piece] = []
    for name in params:
        if ".mlp.experts." in name:
            found = _expert_pieces(files, cfg, name)
            for piece in found:
                if not files.has(piece.key):
                    raise files.missing(piece.key)
            pieces += found
            continue
        candidates = [name]
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            candidates = ["model.embed_tokens.weight"]
        elif name.endswith(".mlp.gate.weight") and cfg.model_type == "mixtral":
            candidates = [name.replace(".mlp.", ".block_sparse_moe."), name]
        pieces.append(Piece(_first_present(files, candidates), name))
    return pieces


def _by_file(files: CheckpointFiles, pieces: list[Piece]) -> dict[str, list[Piece]]:
    by_file: dict[str, list[Piece]] = {}
    for piece in pieces:
        by_file.setdefault(files.file_of[piece.key], []).append(piece)
    return by_file


def _check_shape(files: CheckpointFiles, name: str, handle: Any, piece: Piece, shapes: dict[str, torch.Size]) -> None:
    """The piece exists in its file with the shape config.json implies (reads the header only)."""
    want = tuple(torch.empty(shapes[piece.param], device="meta")[piece.index].shape)
    try:
        found = tuple(handle.get_slice(piece.key).get_shape())
    except Exception:  # the index names a shard that does not hold the tensor
        raise CheckpointError(f"{files.dir / name}: missing tensor '{piece.key}' (named by {INDEX_FILE})") from None
    if found != want:
        raise CheckpointError(
            f"{files.dir / name}: tensor '{piece.key}' has shape {list(found)}, expected {list(want)} from config.json"
        )


def read_pieces(
    files: CheckpointFiles,
    pieces: list[Piece],
    shapes: dict[str, torch.Size],
    dtype: torch.dtype,
    device: torch.device | str,
    check_only: bool = False,
) -> dict[str, torch.Tensor]:
    """Read the pieces, one file at a time, into tensors of ``dtype`` on ``device`` (``check_only``:
    verify names and shapes from the file headers and read no data)."""
    state: dict[str, torch.Tensor] = {}
    for name, group in _by_file(files, pieces).items():
        handle = files.open(name, for_key=group[0].key)
        for piece in group:
            _check_shape(files, name, handle, piece, shapes)
            if check_only:
                continue
            tensor = handle.get_tensor(piece.key)
            if not piece.index:
                state[piece.param] = tensor.to(device=device, dtype=dtype)
                continue
            if piece.param not in state:
                state[piece.param] = torch.empty(shapes[piece.param], dtype=dtype, device=device)
            state[piece.param][piece.index].copy_(tensor)
    return state


def _meta_stage(ckpt_dir: Path, spec: StageSpec) -> tuple[ModelConfig, StageModel, dict[str, torch.Size], list[str], bool]:
    """The stage's model on the meta device, its parameter shapes and the names to read from files."""
    cfg = load_model_config(ckpt_dir)
    if spec.first_layer + spec.num_layers > cfg.num_layers:
        raise CheckpointError(
            f"{ckpt_dir / 'config.json'}: num_hidden_layers is {cfg.num_layers}, stage {spec.index} wants layers "
            f"{spec.first_layer}..{spec.first_layer + spec.num_layers - 1}"
        )
    with torch.device("meta"):
        model = StageModel(cfg, spec)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    tie = cfg.tie_word_embeddings and spec.has_embed and spec.has_head
    wanted = [n for n in shapes if not (tie and n == "lm_head.weight")]
    return cfg, model, shapes, wanted, tie


def check_stage(ckpt_dir: Path, spec: StageSpec) -> None:
    """Every tensor the stage needs is in the checkpoint with the right shape; reads headers, not data.

    Cheap enough to run for every stage before any worker starts, so a broken checkpoint is one
    error line up front rather than a worker failing mid-start."""
    ckpt_dir = Path(ckpt_dir)
    cfg, _, shapes, wanted, _ = _meta_stage(ckpt_dir, spec)
    with CheckpointFiles(ckpt_dir) as files:
        read_pieces(files, plan_stage(files, cfg, wanted), shapes, torch.float32, "meta", check_only=True)


def load_stage(
    ckpt_dir: Path, spec: StageSpec, dtype: torch.dtype, device: torch.device | str, kernels: KernelConfig | None = None
) -> StageModel:
    """Build the stage's model and fill it with its tensors from the checkpoint (and nothing else), fuse
    its projections on CUDA and choose its kernels, per ``kernels`` (None: the run defaults)."""
    kernels = kernels or KernelConfig()
    t0 = time.perf_counter()
    ckpt_dir = Path(ckpt_dir)
    cfg, model, shapes, wanted, tie = _meta_stage(ckpt_dir, spec)
    with CheckpointFiles(ckpt_dir) as files:
        pieces = plan_stage(files, cfg, wanted)
        state = read_pieces(files, pieces, shapes, dtype, device)
        num_files = len({files.file_of[p.key] for p in pieces})
    if tie:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tie:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.requires_grad_(False).eval()
    size = sum(t.numel() * t.element_size() for t in state.values())
    del state  # fusing replaces tensors: the loaded ones must not outlive their modules' reference
    if torch.device(device).type == "cuda" and kernels.fuse_projections:
        fuse_projections(model, kernels)  # one GEMM per layer for q/k/v (and gate/up): fewer, larger launches
    model.use_kernels(kernel_choice.choose(kernels, device, dtype))
    _log.info(
        "stage %d: loaded %d tensors (%.1f MB, %s) for layers %d..%d from %d file(s) in %.2f s",
        spec.index, len(pieces), size / 1e6, str(dtype).removeprefix("torch."), spec.first_layer,
        spec.first_layer + spec.num_layers - 1, num_files, time.perf_counter() - t0,
    )
    return model
