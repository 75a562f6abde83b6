"""The fixtures of the front-end's tests over tests/serve_stack.py, one of each per test module: a test
module gets them with ``pytest_plugins = ["serve_fixtures"]`` (a plugin of its own, so that pytest
rewrites its asserts although the test modules import serve_stack first)."""
from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_stack import load_tok, make_chat_ckpt, make_ckpt, running

from dejavu_py.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_ckpt(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def tok(ckpt: Path) -> Tokenizer:
    """The byte-level BPE tokenizer the tiny checkpoints get (ASCII corpus: other characters are bytes)."""
    return load_tok(ckpt)


@pytest.fixture(scope="module")
def chat_ckpt(ckpt: Path, tmp_path_factory) -> Path:
    return make_chat_ckpt(ckpt, tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def stack(ckpt: Path, tok: Tokenizer) -> Iterator[types.SimpleNamespace]:
    with running(ckpt, tok) as s:
        yield s
