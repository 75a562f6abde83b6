"""recoveries.jsonl: a recovery's record is written once the pipeline produced again and each sequence it
recomputed has its next token or is gone (cancelled), not held until the run ends or the next recovery."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as dist

from dejavu_py.coordinator.recovery_log import RecoveryLog, RecoveryRecord


def _resumed(tmp_path: Path, recomputed: list[int]) -> tuple[RecoveryLog, RecoveryRecord]:
    store = dist.HashStore()
    log = RecoveryLog(lambda: store, tmp_path / "recoveries.jsonl")
    rec = log.open({"s1"}, "lost its connection", {"s1": 0})
    log.resumed(rec, recomputed, time.monotonic())
    return log, rec


def _lines(log: RecoveryLog) -> list[dict]:
    return [json.loads(line) for line in log.path.read_text().splitlines()] if log.path.exists() else []


def test_a_record_whose_recomputed_sequences_are_all_cancelled_is_written_then(tmp_path):
    log, _ = _resumed(tmp_path, [1, 2])
    log.on_tokens([7], generation=1)  # the pipeline produces again, for a sequence not recomputed
    assert log.records == []
    log.gone([1], generation=1)
    assert log.records == []  # 2 still recomputes
    log.gone([2, 9], generation=1)  # 9: no recovery waits for it
    assert len(log.records) == 1 and _lines(log) == log.records
    doc = log.records[0]
    assert doc["failed"] == ["s1"] and doc["recompute_cancelled"] == 2 and "kill_to_next_token_s" in doc
    assert log.pending == {} and log.t_resume == {}
    log.flush("run ended before it finished", generation=1)
    assert len(_lines(log)) == 1  # written once


def test_a_cancel_before_the_pipeline_produced_again_waits_for_that_token(tmp_path):
    log, _ = _resumed(tmp_path, [1])
    log.gone([1], generation=1)
    assert log.records == []  # the interruption is not over yet: nothing produced since resuming
    log.on_tokens([4], generation=1)
    assert len(log.records) == 1 and "kill_to_next_token_s" in log.records[0]


def test_a_recomputed_sequence_that_produces_still_times_the_recompute(tmp_path):
    log, _ = _resumed(tmp_path, [1, 2])
    log.on_tokens([1], generation=1)
    assert log.records == []
    log.gone([2], generation=1)
    (doc,) = log.records
    assert "recompute_s" in doc["phases"] and doc["recompute_cancelled"] == 1


def test_sequences_gone_without_a_recovery_write_nothing(tmp_path):
    store = dist.HashStore()
    log = RecoveryLog(lambda: store, tmp_path / "recoveries.jsonl")
    log.gone([1, 2], generation=0)
    assert log.records == [] and not log.path.exists()
