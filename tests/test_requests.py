"""The request file loader and the checkpoint tokenizer."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from dejavu_py.coordinator.request import (
    KNOWN_FIELDS,
    Request,
    RequestError,
    RequestLimits,
    derive_seed,
    load_requests,
)
from dejavu_py.tokenizer import Tokenizer, load_tokenizer
from dejavu_py.errors import UserError
from dejavu_py.protocol.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
LIMITS = RequestLimits(vocab_size=384, max_model_len=64, kv_capacity_tokens=1024, default_max_new_tokens=16, run_seed=7)


def _make_checkpoint_module():
    spec = importlib.util.spec_from_file_location("make_checkpoint", ROOT / "tools" / "make_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "olmoe"
    return _make_checkpoint_module().make_checkpoint(out, family="olmoe")


@pytest.fixture(scope="module")
def tok(ckpt) -> Tokenizer:
    t = load_tokenizer(ckpt)
    assert t is not None
    return t


def _load(tmp_path, monkeypatch, lines: list, limits=LIMITS, tokenizer=None):
    """Write lines (dicts are dumped, strings kept) to ./requests.jsonl and load it by a relative name."""
    monkeypatch.chdir(tmp_path)
    text = "\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n"
    Path("requests.jsonl").write_text(text, encoding="utf-8")
    return load_requests(Path("requests.jsonl"), limits, tokenizer)


def _one_error(tmp_path, monkeypatch, line, **kw) -> RequestError:
    reqs, errs = _load(tmp_path, monkeypatch, [line], **kw)
    assert reqs == [] and len(errs) == 1, (reqs, errs)
    return errs[0]


# --- good lines ---------------------------------------------------------------------------------------


def test_good_lines_defaults_and_blank_lines(tmp_path, monkeypatch):
    reqs, errs = _load(
        tmp_path,
        monkeypatch,
        [
            {"id": "a", "input_ids": [1, 5, 9]},
            "",
            "   ",
            {"id": 17, "input_ids": [3], "max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 5,
             "seed": 123, "stop_token_ids": [2, 7]},
        ],
    )
    assert errs == []
    a, b = reqs
    assert (a.line, a.id, a.input_ids, a.max_new_tokens, a.prompt) == (1, "a", [1, 5, 9], 16, None)
    assert a.sampling == SamplingParams(temperature=0.0, top_p=1.0, top_k=0, seed=derive_seed(7, "a"))
    assert a.stop_token_ids == () and not a.clamped and a.max_new_tokens_requested == 16
    assert (b.line, b.id, b.max_new_tokens, b.stop_token_ids) == (4, "17", 4, (2, 7))
    assert b.sampling == SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=123)


def test_derive_seed_is_stable_63_bit_and_spread():
    assert derive_seed(0, "q1") == 2113341396016237684  # pinned: the same on every machine and run
    assert derive_seed(7, "a") == derive_seed(7, "a")
    seeds = {derive_seed(r, i) for r in range(3) for i in ("a", "b", "c", "1")}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)


def test_sampling_params_checks():
    SamplingParams(temperature=0, top_p=1, top_k=0, seed=2**63 - 1)
    for bad in (
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(top_p=0.0),
        dict(top_p=1.01),
        dict(top_k=-1),
        dict(top_k=True),
        dict(top_k=1.0),
        dict(seed=-1),
        dict(seed=2**63),
        dict(seed=False),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


# --- per-line errors ------------------------------------------------------------------------------------


def test_error_str_names_file_line_and_field(tmp_path, monkeypatch):
    reqs, errs = _load(
        tmp_path,
        monkeypatch,
        [{"id": "a", "input_ids": [1]}, {"id": "b", "input_ids": [1]}, {"id": "c", "input_ids": [1], "max_new_tokens": -1}],
    )
    assert [r.id for r in reqs] == ["a", "b"]
    assert str(errs[0]) == "requests.jsonl line 3: field 'max_new_tokens': expected a positive integer, got -1"
    assert (errs[0].line, errs[0].id) == (3, "c")


@pytest.mark.parametrize(
    "line, needle",
    [
        ('{"id": "a", "input_ids": [1,]}', "invalid JSON: Expecting value at column"),
        ("[1, 2]", "expected a JSON object"),
        ('"hello"', "expected a JSON object"),
        ('{"id": "a", "id": "b", "input_ids": [1]}', "field 'id' is given twice"),
        ({"id": "a", "input_ids": [1], "max_tokens": 3}, "unknown field 'max_tokens'; did you mean 'max_new_tokens'?"),
        ({"input_ids": [1]}, "field 'id' is missing"),
        ({"id": "", "input_ids": [1]}, "field 'id': expected a non-empty string or an integer"),
        ({"id": True, "input_ids": [1]}, "got true"),
        ({"id": 1.5, "input_ids": [1]}, "field 'id'"),
        ({"id": "a"}, "got neither"),
        ({"id": "a", "input_ids": [1], "prompt": "x"}, "got both"),
        ({"id": "a", "prompt": "hello"}, "no tokenizer.json; give 'input_ids' instead"),
        ({"id": "a", "prompt": 5}, "field 'prompt': expected a string"),
        ({"id": "a", "input_ids": []}, "field 'input_ids': expected a non-empty list"),
        ({"id": "a", "input_ids": "1 2"}, "field 'input_ids'"),
        ({"id": "a", "input_ids": [1, True]}, "item 1 is true, expected an integer"),
        ({"id": "a", "input_ids": [1, 2.0]}, "item 1 is 2.0"),
        ({"id": "a", "input_ids": [1, 384]}, "item 1 is 384, outside the vocabulary [0, 384)"),
        ({"id": "a", "input_ids": [-1]}, "outside the vocabulary"),
        ({"id": "a", "input_ids": [1], "max_new_tokens": 0}, "'max_new_tokens': expected a positive integer, got 0"),
        ({"id": "a", "input_ids": [1], "max_new_tokens": 2.0}, "got 2.0"),
        ({"id": "a", "input_ids": [1], "max_new_tokens": True}, "got true"),
        ({"id": "a", "input_ids": [1], "temperature": -1}, "'temperature': expected a number >= 0"),
        ({"id": "a", "input_ids": [1], "temperature": "hot"}, "'temperature'"),
        ({"id": "a", "input_ids": [1], "temperature": False}, "'temperature'"),
        ('{"id": "a", "input_ids": [1], "temperature": NaN}', "'temperature'"),
        ({"id": "a", "input_ids": [1], "top_p": 0}, "'top_p': expected a number in (0, 1]"),
        ({"id": "a", "input_ids": [1], "top_p": 1.5}, "'top_p'"),
        ({"id": "a", "input_ids": [1], "top_k": -2}, "'top_k': expected an integer >= 0"),
        ({"id": "a", "input_ids": [1], "top_k": 2.5}, "'top_k'"),
        ({"id": "a", "input_ids": [1], "seed": -1}, "'seed': expected an integer in [0, 2**63)"),
        ({"id": "a", "input_ids": [1], "seed": 2**63}, "'seed'"),
        ({"id": "a", "input_ids": [1], "seed": "7"}, "'seed'"),
        ({"id": "a", "input_ids": [1], "seed": True}, "'seed'"),
        ({"id": "a", "input_ids": [1], "stop_token_ids": 2}, "'stop_token_ids': expected a list of token ids"),
        ({"id": "a", "input_ids": [1], "stop_token_ids": [2, 999]}, "item 1 is 999, outside the vocabulary"),
    ],
)
def test_bad_line(tmp_path, monkeypatch, line, needle):
    err = _one_error(tmp_path, monkeypatch, line)
    assert needle in err.message, err.message
    assert str(err).startswith("requests.jsonl line 1: ") and "\n" not in str(err)


def test_unknown_field_lists_known_ones(tmp_path, monkeypatch):
    err = _one_error(tmp_path, monkeypatch, {"id": "a", "input_ids": [1], "zzz": 1})
    assert "unknown field 'zzz'" in err.message and ", ".join(KNOWN_FIELDS) in err.message


def test_error_keeps_the_id_when_it_was_read(tmp_path, monkeypatch):
    _, errs = _load(tmp_path, monkeypatch, [{"id": 5, "input_ids": [1], "top_k": -1}, '{"id": 6,', {"input_ids": [1]}])
    assert [(e.line, e.id) for e in errs] == [(1, "5"), (2, None), (3, None)]


def test_duplicate_ids_name_the_first_line(tmp_path, monkeypatch):
    reqs, errs = _load(
        tmp_path,
        monkeypatch,
        [{"id": "x", "input_ids": [1]}, {"id": "y", "input_ids": [1]}, "", {"id": "x", "input_ids": [2]}, {"id": 3, "input_ids": [1]},
         {"id": "3", "input_ids": [1]}],
    )
    assert [r.id for r in reqs] == ["x", "y", "3"]
    assert [(e.line, e.id) for e in errs] == [(4, "x"), (6, "3")]
    assert "duplicate id \"x\": line 1 already has it" in errs[0].message
    assert "line 5 already has it" in errs[1].message


def test_bad_lines_do_not_stop_good_ones(tmp_path, monkeypatch):
    lines = [{"id": i, "input_ids": [1]} if i % 2 else "{oops" for i in range(10)]
    reqs, errs = _load(tmp_path, monkeypatch, lines)
    assert [r.line for r in reqs] == [2, 4, 6, 8, 10] and [e.line for e in errs] == [1, 3, 5, 7, 9]


# --- prompt length ----------------------------------------------------------------------------------------


def test_prompt_length_limited_by_model(tmp_path, monkeypatch):
    limits = RequestLimits(vocab_size=384, max_model_len=8, kv_capacity_tokens=100, default_max_new_tokens=50)
    reqs, errs = _load(
        tmp_path,
        monkeypatch,
        [{"id": "fits", "input_ids": [1] * 7}, {"id": "long", "input_ids": [1] * 8}, {"id": "short", "input_ids": [1] * 3, "max_new_tokens": 2}],
        limits=limits,
    )
    fits, short = reqs
    assert (fits.max_new_tokens, fits.max_new_tokens_requested, fits.clamped) == (1, 50, True)
    assert (short.max_new_tokens, short.clamped) == (2, False)
    (err,) = errs
    assert err.line == 2 and "prompt has 8 tokens" in err.message and "model's maximum length (8 tokens)" in err.message


def test_prompt_length_limited_by_cache(tmp_path, monkeypatch):
    limits = RequestLimits(vocab_size=384, max_model_len=100, kv_capacity_tokens=6, default_max_new_tokens=50)
    reqs, errs = _load(tmp_path, monkeypatch, [{"id": "a", "input_ids": [1] * 6}, {"id": "b", "input_ids": [1] * 2}], limits=limits)
    assert [(r.id, r.max_new_tokens) for r in reqs] == [("b", 4)]
    assert "prompt has 6 tokens" in errs[0].message and "KV cache capacity per sequence (6 tokens" in errs[0].message


# --- whole-file errors ----------------------------------------------------------------------------------------


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl: no such file"):
        load_requests(tmp_path / "nope.jsonl", LIMITS, None)
    with pytest.raises(UserError, match="is a directory"):
        load_requests(tmp_path, LIMITS, None)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    with pytest.raises(UserError, match="blank.jsonl: no requests"):
        load_requests(blank, LIMITS, None)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"id": "a", "input_ids": [1]}\n{"id": "caf\xe9", "input_ids": [1]}\n')
    with pytest.raises(UserError, match=r"not UTF-8 text \(invalid byte 0xe9 on line 2\)"):
        load_requests(latin, LIMITS, None)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"id": 1, "input_ids": [1]}\n')
    p.chmod(0)
    try:
        with pytest.raises(UserError, match="cannot read it"):
            load_requests(p, LIMITS, None)
    finally:
        p.chmod(0o600)


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_bytes('\ufeff{"id": "\u00e9", "input_ids": [1]}\r\n\r\n{"id": "b", "input_ids": [2]}\r\n'.encode())
    reqs, errs = load_requests(p, LIMITS, None)
    assert errs == [] and [(r.line, r.id) for r in reqs] == [(1, "\u00e9"), (3, "b")]


# --- tokenizer --------------------------------------------------------------------------------------------------

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnewlines  ",
    "<s>special</s> tokens <pad> inside",
    "unicode: caf\u00e9 \u65e5\u672c \U0001f600",
    "",
]


def test_tokenizer_matches_transformers(ckpt, tok):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(ckpt)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=True), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    mixed = [1, 40, 41, 2, 0, 300, 2]
    assert tok.decode(mixed) == ref.decode(mixed, skip_special_tokens=True)
    assert tok.vocab_size == len(ref)


def test_tokenizer_post_processor_is_used(ckpt, tmp_path):
    """A tokenizer.json whose template adds BOS: both add it."""
    from tokenizers import Tokenizer as HF
    from tokenizers import processors
    from transformers import AutoTokenizer

    d = tmp_path / "bos"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / f, d / f)
    hf = HF.from_file(str(d / "tokenizer.json"))
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf.save(str(d / "tokenizer.json"))
    ours, ref = load_tokenizer(d), AutoTokenizer.from_pretrained(d)
    ids = ours.encode("Hello world")
    assert ids[0] == 1 and ids == ref.encode("Hello world")
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == "Hello world"


def test_no_tokenizer_and_corrupt_tokenizer(tmp_path):
    assert load_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(UserError, match=r"tokenizer\.json: not a valid tokenizer file"):
        load_tokenizer(tmp_path)


def test_prompts_are_encoded(tmp_path, monkeypatch, tok):
    limits = RequestLimits(vocab_size=384, max_model_len=64, kv_capacity_tokens=64, default_max_new_tokens=8)
    reqs, errs = _load(
        tmp_path,
        monkeypatch,
        [{"id": "p", "prompt": "The quick brown fox"}, {"id": "e", "prompt": ""}, {"id": "l", "prompt": "fox " * 80}],
        limits=limits,
        tokenizer=tok,
    )
    (r,) = reqs
    assert r.prompt == "The quick brown fox" and r.input_ids == tok.encode("The quick brown fox")
    assert r.max_new_tokens == 8
    assert "encodes to no tokens" in errs[0].message
    assert errs[1].line == 3 and "prompt has" in errs[1].message


def test_prompt_tokens_outside_model_vocab(tmp_path, monkeypatch, tok):
    limits = RequestLimits(vocab_size=10, max_model_len=64, kv_capacity_tokens=64, default_max_new_tokens=8)
    err = _one_error(tmp_path, monkeypatch, {"id": "p", "prompt": "The quick brown fox"}, limits=limits, tokenizer=tok)
    assert "outside the model's vocabulary [0, 10)" in err.message


def test_request_dataclass_defaults():
    r = Request(line=1, id="a", input_ids=[1, 2], max_new_tokens=3, sampling=SamplingParams(seed=1))
    assert r.max_new_tokens_requested == 3 and not r.clamped and r.num_prompt_tokens == 2 and r.stop_token_ids == ()


def test_a_request_is_its_id_the_line_only_says_where_the_file_had_it(tmp_path, monkeypatch):
    reqs, _ = _load(tmp_path, monkeypatch, ["", {"id": 7, "input_ids": [1]}])
    assert [(r.id, r.line) for r in reqs] == [("7", 2)]
    online = Request(id="chat-1", input_ids=[1], max_new_tokens=2, sampling=SamplingParams(seed=1))
    assert online.line is None
