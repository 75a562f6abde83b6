"""The tokenizer make_checkpoint writes covers the model's whole vocabulary, special tokens at the
config's ids, and loads alike in transformers and in dejavu_py.tokenizer."""
from __future__ import annotations

import json
import types

import pytest
from make_checkpoint import build_tokenizer

from dejavu_py.tokenizer import load_tokenizer

TEXT = "The quick brown fox, caf\u00e9 \U0001f600"


def _ref(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_real_vocab_is_covered(tmp_path):
    """A Qwen-sized vocabulary: every id has a distinct token, bos/eos where the config says."""
    cfg = types.SimpleNamespace(vocab_size=151_936, bos_token_id=151_643, eos_token_id=[151_645, 151_643], pad_token_id=None)
    build_tokenizer(cfg, tmp_path)
    ref, tok = _ref(tmp_path), load_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == len(set(vocab.values())) == 151_936 == len(ref) == tok.vocab_size
    assert sorted(vocab.values()) == list(range(151_936))
    added = json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"]
    assert ref.eos_token_id == 151_645 and {a["id"] for a in added if a["special"]} == {151_643, 151_645}
    ids = tok.encode(TEXT)
    assert ids == ref.encode(TEXT) and tok.decode(ids) == TEXT
    high = [151_935, 150_000, 151_645, 5]
    text = tok.decode(high)
    assert text == ref.decode(high, skip_special_tokens=True)
    assert "<t151935>" in text and "<t150000>" in text


def test_tiny_vocab_keeps_its_trained_tokens(tmp_path):
    """The tiny presets' ids: pad 0, bos 1, eos 2; a config that names none gets the same."""
    for d, cfg in ((tmp_path / "named", types.SimpleNamespace(vocab_size=384, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
                   (tmp_path / "unnamed", types.SimpleNamespace(vocab_size=384))):
        build_tokenizer(cfg, d)
        ref, tok = _ref(d), load_tokenizer(d)
        assert (ref.pad_token_id, ref.bos_token_id, ref.eos_token_id) == (0, 1, 2)
        assert len(ref) == tok.vocab_size == 384
        ids = tok.encode(TEXT)
        assert ids == ref.encode(TEXT) and tok.decode(ids) == TEXT and len(ids) < len(TEXT.encode())  # real merges


def test_vocab_larger_than_training_is_padded(tmp_path):
    build_tokenizer(types.SimpleNamespace(vocab_size=5000), tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 5000 and tok.decode([4999]) == "<t4999>"


@pytest.mark.parametrize("cfg, needle", [
    (types.SimpleNamespace(vocab_size=100), "too small"),
    (types.SimpleNamespace(vocab_size=384, eos_token_id=384), "outside vocab_size"),
])
def test_bad_vocab_says_what_to_change(tmp_path, cfg, needle):
    with pytest.raises(SystemExit, match=needle):
        build_tokenizer(cfg, tmp_path)
