"""Chat messages to prompt token ids with the checkpoint's chat template, as transformers renders it.

transformers is imported and the tokenizer loaded on the first chat request only (once, off the event
loop): a server that only completes text starts without it. A checkpoint without a template, and no
``--chat-template`` file, answers chat requests with a 400 that says so.
"""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from dejavu_py import log
from dejavu_py.serve.api_errors import APIError, bad_request
from dejavu_py.serve.schemas import ChatMessage

_log = log.get(__name__)


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as a template reads them: text parts joined into one string (as vLLM does)."""
    if not messages:
        raise bad_request("field 'messages': must not be empty", "messages")
    out = []
    for i, m in enumerate(messages):
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"field 'messages[{i}].content[{j}]': only text parts are supported, got type "
                                      f"{part.type!r}", "messages")
                texts.append(part.text)
            d["content"] = "\n".join(texts)
        out.append(d)
    return out


class ChatTemplate:
    """The checkpoint's tokenizer (transformers) and its chat template, or the one given instead."""

    def __init__(self, ckpt_dir: Path, template_file: Path | None = None) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.override = Path(template_file).read_text(encoding="utf-8") if template_file else None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                try:
                    from transformers import AutoTokenizer
                except ImportError:
                    raise APIError(500, "chat completions need the transformers package on the server "
                                        "(pip install transformers); use /v1/completions meanwhile") from None
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.ckpt_dir))
                _log.info("loaded the chat template's tokenizer from %s", self.ckpt_dir)
            return self._tokenizer

    async def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                     continue_final_message: bool = False, extra: dict[str, Any] | None = None) -> list[int]:
        """Prompt token ids of ``messages`` (the template's special tokens included, none added again)."""
        tok = self._tokenizer or await asyncio.to_thread(self._load)
        template = self.override or getattr(tok, "chat_template", None)
        if not template:
            raise bad_request(
                f"the checkpoint {self.ckpt_dir.name} has no chat template (no 'chat_template' in tokenizer_config.json "
                "and no chat_template.jinja); start the server with --chat-template FILE, or use /v1/completions",
                "messages", "chat_template_missing")
        if continue_final_message and add_generation_prompt:
            add_generation_prompt = False  # continuing the last message means no new assistant turn
        try:
            ids = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=add_generation_prompt,
                                          continue_final_message=continue_final_message, tokenize=True,
                                          return_dict=False, **(extra or {}))
        except Exception as e:  # jinja's TemplateError, or a template that raises on these messages
            raise bad_request(f"field 'messages': the chat template cannot render them ({type(e).__name__}: {e})",
                              "messages") from None
        return [int(t) for t in ids]
