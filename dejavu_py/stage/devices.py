"""Which device and dtype a worker computes on, and how two members' activations travel."""
from __future__ import annotations

import socket

import torch

from dejavu_py.comm import stream_sync
from dejavu_py.config import PipelineConfig
from dejavu_py.errors import UserError


def resolve_device(cfg: PipelineConfig, local_rank: int) -> torch.device:
    """``cuda:<local_rank mod GPUs>`` when GPUs are wanted and visible, else CPU."""
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU is visible to this process (check CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def resolve_dtype(cfg: PipelineConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, cfg.dtype)


def placement(device: torch.device) -> dict:
    """What a member publishes about where it runs."""
    return {"host": socket.gethostname(), "device": str(device)}


def data_backend(a: dict, b: dict) -> str:
    """NCCL between two members on different GPUs; gloo on CPU; between two that share a GPU (two ranks
    on one GPU cannot be members of one NCCL communicator) gloo plus host rings (comm/host_ring.py)."""
    both_gpu = a["device"].startswith("cuda") and b["device"].startswith("cuda")
    same_gpu = a["host"] == b["host"] and a["device"] == b["device"]
    if both_gpu and same_gpu:
        return "ring" if stream_sync.available() else "gloo"
    return "nccl" if both_gpu else "gloo"
