"""Output records and the atomic, line-ordered output file."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dejavu_py.coordinator import output
from dejavu_py.coordinator.output import (
    Timings,
    error_record,
    read_outputs,
    request_error_record,
    sequence_record,
    success_record,
    write_outputs,
)
from dejavu_py.coordinator.request import Request, RequestError
from dejavu_py.coordinator.sequence import Sequence
from dejavu_py.errors import UserError
from dejavu_py.protocol.sampling import SamplingParams


class _FakeTokenizer:
    vocab_size = 100

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"t{i}" for i in ids)


def _req(line: int, rid: str, n_prompt: int = 3) -> Request:
    return Request(line=line, id=rid, input_ids=list(range(1, n_prompt + 1)), max_new_tokens=8, sampling=SamplingParams(seed=1))


T = Timings(queued_s=0.0123456789, first_token_s=0.5, total_s=1.25)


def test_success_record_shape():
    rec = success_record(_req(2, "a"), [5, 6, 2], "stop", T)
    assert rec == {
        "line": 2,
        "id": "a",
        "output_ids": [5, 6, 2],
        "finish_reason": "stop",
        "num_prompt_tokens": 3,
        "timings": {"queued_s": 0.012346, "first_token_s": 0.5, "total_s": 1.25},
    }
    with_text = success_record(_req(2, "a"), [5, 6], "length", T, tokenizer=_FakeTokenizer())
    assert with_text["text"] == "t5 t6" and list(with_text)[:4] == ["line", "id", "output_ids", "text"]


def test_ids_outside_the_tokenizer_are_noted_and_warned_once(caplog, monkeypatch):
    """A tokenizer smaller than the model's vocabulary: the text leaves those ids out, and says so."""
    monkeypatch.setattr(output, "_warned", set())
    with caplog.at_level("WARNING", logger=output._log.name):
        rec = success_record(_req(2, "a"), [5, 150, 6, 100, 2], "stop", T, tokenizer=_FakeTokenizer())
        again = success_record(_req(3, "b"), [300], "length", T, tokenizer=_FakeTokenizer())
    assert rec["text"] == "t5 t6 t2" and list(rec)[:5] == ["line", "id", "output_ids", "text", "text_note"]
    assert rec["text_note"] == ("2 of the output ids are outside the tokenizer's vocabulary (100 tokens): "
                                "the text leaves them out")
    assert again["text"] == "" and again["text_note"].startswith("1 of the output ids")
    warnings = [r for r in caplog.records if "outside the tokenizer's vocabulary" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING" and "vocab_size" in warnings[0].getMessage()
    assert "text_note" not in success_record(_req(4, "c"), [99, 0], "stop", T, tokenizer=_FakeTokenizer())


def test_sequence_record_counts_timings_from_arrival():
    seq = Sequence(0, _req(4, "q"), output_ids=[7, 8], finish_reason="stop", t_arrival=10.0, t_admitted=10.5,
                   t_first_token=11.0, t_finish=12.0)
    assert sequence_record(seq, _FakeTokenizer()) == success_record(
        seq.request, [7, 8], "stop", Timings(0.5, 1.0, 2.0), tokenizer=_FakeTokenizer())
    seq.t_prefilled, seq.t_kv_ready, seq.kv_bytes = 10.8, 11.5, 4096  # disaggregated: the prompt's KV
    assert sequence_record(seq)["timings"] == {"queued_s": 0.5, "first_token_s": 1.0, "total_s": 2.0,
                                               "kv_bytes": 4096, "kv_transfer_s": 1.0, "kv_after_prefill_s": 0.7}


def test_success_record_checks():
    with pytest.raises(ValueError, match="finish_reason"):
        success_record(_req(1, "a"), [1], "eos", T)
    with pytest.raises(ValueError, match="timing"):
        success_record(_req(1, "a"), [1], "stop", Timings(-1.0, 0.0, 0.0))


def test_error_records():
    err = RequestError(line=3, id=None, message="invalid JSON: Expecting value at column 5", source="requests.jsonl")
    assert request_error_record(err) == {
        "line": 3,
        "id": None,
        "error": "requests.jsonl line 3: invalid JSON: Expecting value at column 5",
    }
    assert error_record(4, "q4", "stage 1 failed twice") == {"line": 4, "id": "q4", "error": "stage 1 failed twice"}
    assert error_record(None, "chat-1", "stopped") == {"line": None, "id": "chat-1", "error": "stopped"}  # no file


def test_write_in_line_order_atomically_and_read_back(tmp_path):
    out = tmp_path / "deep" / "er" / "out.jsonl"
    records = [
        success_record(_req(5, "e"), [1], "length", T),
        error_record(1, None, "requests.jsonl line 1: bad"),
        success_record(_req(3, "c\u00e9"), [2, 3], "stop", T, tokenizer=_FakeTokenizer()),
    ]
    write_outputs(out, records)
    assert [r["line"] for r in read_outputs(out)] == [1, 3, 5]
    assert read_outputs(out) == sorted(records, key=lambda r: r["line"])
    text = out.read_text(encoding="utf-8")
    assert text.endswith("\n") and "c\u00e9" in text and len(text.splitlines()) == 3
    assert all(isinstance(json.loads(line), dict) for line in text.splitlines())
    assert os.listdir(out.parent) == ["out.jsonl"]  # no temp file left behind
    write_outputs(out, records[:1])  # replaces the whole file
    assert read_outputs(out) == records[:1]


def test_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    write_outputs(out, [error_record(1, "a", "x")])

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(UserError, match="out.jsonl: cannot write it"):
        write_outputs(out, [error_record(1, "b", "y")])
    assert read_outputs(out) == [error_record(1, "a", "x")]
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_write_needs_lines_and_a_writable_place(tmp_path):
    with pytest.raises(ValueError, match="line"):
        write_outputs(tmp_path / "o.jsonl", [{"id": "a", "error": "x"}])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot create it"):
        write_outputs(blocker / "o.jsonl", [error_record(1, "a", "x")])


def test_read_outputs_errors(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text('{"line": 1}\n\n[1]\n')
    with pytest.raises(UserError, match="line 3: expected a JSON object"):
        read_outputs(p)
    p.write_text('{"line": 1}\n{oops\n')
    with pytest.raises(UserError, match="line 2: invalid JSON"):
        read_outputs(p)
    with pytest.raises(UserError, match="cannot read"):
        read_outputs(Path(tmp_path / "missing.jsonl"))
