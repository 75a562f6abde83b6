"""The checkpoint's tokenizer, read with the ``tokenizers`` library alone (no transformers: fast start).

Encoding matches ``AutoTokenizer.from_pretrained(ckpt).encode(text)`` (special tokens added by the
tokenizer's post-processor); decoding matches ``decode(ids, skip_special_tokens=True)``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from dejavu_py import log
from dejavu_py.errors import UserError

_log = log.get(__name__)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


@dataclass
class Tokenizer:
    """Text <-> token ids for one checkpoint."""

    path: Path
    """The tokenizer.json it was read from."""
    backend: _HFTokenizer
    """The ``tokenizers`` object, post-processor as in tokenizer.json (transformers 5 ignores
    tokenizer_config.json's add_bos_token / add_eos_token when a tokenizer.json exists)."""
    clean_up_spaces: bool = False
    """Apply transformers' clean_up_tokenization on decode (tokenizer_config.json asks, and the model is not BPE)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with the special tokens the post-processor adds (e.g. BOS)."""
        return list(self.backend.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens skipped."""
        text = self.backend.decode(list(ids), skip_special_tokens=True)
        return _clean_up(text) if self.clean_up_spaces else text

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (spaces before punctuation and contractions)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(a, b)
    return text


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({e}); fix or delete the file") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    return cfg


def load_tokenizer(ckpt_dir: Path) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when it has no tokenizer.json (then requests need input_ids)."""
    path = Path(ckpt_dir) / TOKENIZER_FILE
    if not path.is_file():
        _log.info("%s: no %s; requests must give input_ids", ckpt_dir, TOKENIZER_FILE)
        return None
    try:
        backend = _HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for bad files
        raise UserError(f"{path}: not a valid tokenizer file ({e}); re-download it, or delete it and give input_ids") from None
    cfg = _read_config(Path(ckpt_dir) / CONFIG_FILE)
    is_bpe = type(backend.model).__name__ == "BPE"
    clean = bool(cfg.get("clean_up_tokenization_spaces", False)) and not is_bpe
    return Tokenizer(path=path, backend=backend, clean_up_spaces=clean)
