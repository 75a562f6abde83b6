"""Checks a whole run can fail on, done before any worker starts (every rank does the same, so a
mistake is the same one line everywhere, and rank 0 says it)."""
from __future__ import annotations

from dejavu_py.config import RunConfig
from dejavu_py.models.config import ModelConfig, load_model_config
from dejavu_py.models.loader import check_stage
from dejavu_py.protocol.layout import Layout, build_layout


def prepare(cfg: RunConfig, world_size: int) -> tuple[ModelConfig, Layout]:
    """The model's config and the pipeline layout; raises UserError on a bad checkpoint or split."""
    model_cfg = load_model_config(cfg.model)
    layout = build_layout(cfg, model_cfg.num_layers, world_size)
    for member in layout.members:
        check_stage(cfg.model, member.stage)  # headers only: names and shapes of every tensor
    return model_cfg, layout
