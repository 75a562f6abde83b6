"""What every request handler shares: the engine client, the tokenizer, the coordinator's limits, the
settings and the metrics; and the checks that come before any work (model name, admission)."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from dejavu_py.protocol.serving import ServerInfo
from dejavu_py.serve.api_errors import APIError
from dejavu_py.serve.chat_template import ChatTemplate
from dejavu_py.serve.engine_client import EngineClient
from dejavu_py.serve.generation import Generation
from dejavu_py.serve.metrics import ServeMetrics
from dejavu_py.serve.params import (
    SamplingDefaults,
    build_submit,
    fit_max_tokens,
    stop_strings,
)
from dejavu_py.serve.prompts import Prompt
from dejavu_py.serve.schemas import SamplingFields
from dejavu_py.serve.settings import FrontEndConfig
from dejavu_py.tokenizer import Tokenizer


@dataclass
class ServeContext:
    engine: EngineClient
    tokenizer: Tokenizer
    info: ServerInfo
    config: FrontEndConfig
    ckpt_dir: Path
    defaults: SamplingDefaults
    metrics: ServeMetrics = field(init=False)
    chat: ChatTemplate = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.metrics = ServeMetrics(self.model_name)
        self.chat = ChatTemplate(self.ckpt_dir, self.config.chat_template)
        self.engine.state_listeners.append(self.metrics.on_engine_state)
        if self.engine.state is not None:
            self.metrics.on_engine_state(self.engine.state)

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or self.info.model

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           "model", "model_not_found")

    def admit(self, count: int) -> None:
        """503 while the engine cannot serve, 429 when ``count`` more requests would exceed --max-waiting."""
        retry = {"Retry-After": str(self.config.retry_after_s)}
        if not self.engine.serving:
            raise APIError(503, "the engine is not serving now (starting, or failed); retry later", None,
                           "engine_unavailable", retry)
        if self.engine.in_flight + count > self.config.max_waiting:
            raise APIError(429, f"too many requests in flight ({self.engine.in_flight}, at most "
                                f"{self.config.max_waiting}); retry later", None, "rate_limit_exceeded", retry)

    def generations(self, kind: str, body: SamplingFields, prompts: list[Prompt], prompt_param: str,
                    echo: bool = False) -> tuple[str, list[Generation]]:
        """A response id and one Generation per prompt, each fitted to the model's length (or a 400)."""
        base = f"{kind}-{uuid.uuid4().hex}"
        stops = stop_strings(body)
        t_arrival = time.time()
        gens = []
        for i, prompt in enumerate(prompts):
            max_tokens = fit_max_tokens(len(prompt.ids), body, self.info, prompt_param)
            rid = base if len(prompts) == 1 else f"{base}-{i}"
            submit = build_submit(rid, prompt.ids, max_tokens, body, self.defaults, self.info)
            gens.append(Generation(i, submit, prompt, self.engine, self.tokenizer, self.info, self.metrics, stops,
                                   body.include_stop_str_in_output, echo, self.config.detok_context_tokens,
                                   t_arrival))
        return base, gens
