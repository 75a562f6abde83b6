"""The front-end's settings: every default of the HTTP server in one dataclass, checked on creation.

The command line (serve/__main__.py) fills it; the app and the engine client read it. It lives here, not
in config.py, because only this process reads it and the coordinator's rank passes it as flags.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dejavu_py.errors import UserError


@dataclass(frozen=True)
class FrontEndConfig:
    """How the OpenAI-compatible server listens, admits requests and talks to the coordinator."""

    host: str = "127.0.0.1"
    """Interface to listen on; loopback unless the operator opens it (0.0.0.0) on purpose."""
    port: int = 8000
    """HTTP port (vLLM's default, so that clients written for it need no change)."""
    served_model_name: str | None = None
    """Name clients pass as "model"; None = the name the coordinator announces in ServerInfo."""
    max_waiting: int = 1024
    """Requests (prompts) in flight in this front-end beyond which a new one gets 429 Retry-After:
    a bounded queue keeps latency bounded and tells clients to back off instead of timing out."""
    retry_after_s: int = 1
    """Seconds a 429 or 503 answer asks the client to wait (the Retry-After header)."""
    connect_timeout_s: float = 60.0
    """How long to wait for the coordinator to accept the link and send ServerInfo at start."""
    reconnect_s: float = 10.0
    """After the link drops, how long to try to connect again before the process exits (a coordinator
    that restarts its listener keeps the streams; one that is gone ends this process)."""
    chat_template: Path | None = None
    """A Jinja chat template file that replaces the checkpoint's (or supplies one it lacks)."""
    default_temperature: float = 1.0
    """Temperature of a request that gives none, as OpenAI's API documents it, unless the checkpoint's
    generation_config.json sets one."""
    detok_context_tokens: int = 5
    """Prompt tokens decoded before the output when detokenizing incrementally: tokenizers that drop a
    leading space at the start of a text (SentencePiece) then render the first output token as they
    would inside the text."""
    graceful_shutdown_s: float = 5.0
    """On shutdown, how long open HTTP connections may take to finish."""
    log_level: str = "info"
    """Level of this process's log (stderr) and of uvicorn's."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise UserError(f"--port {self.port}: must be in 1..65535")
        if self.max_waiting < 1:
            raise UserError(f"--max-waiting {self.max_waiting}: must be at least 1")
        if self.retry_after_s < 0:
            raise UserError(f"retry_after_s {self.retry_after_s}: must be >= 0")
        for name in ("connect_timeout_s", "reconnect_s", "graceful_shutdown_s"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} {getattr(self, name)}: must be >= 0 seconds")
        if self.default_temperature < 0:
            raise UserError(f"default_temperature {self.default_temperature}: must be >= 0")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise UserError(f"--log-level {self.log_level!r}: choose debug, info, warning, error or critical")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise UserError(f"--chat-template {self.chat_template}: no such file; give a Jinja template file")
