"""Where the coordinator's answers go: an :class:`OutputSink`.

It is told of every request's new tokens as step results bring them, and of every request's end: its
whole output record (coordinator/output.py), a success or an error. The output file is one sink
(:class:`JsonlSink`); an online front-end is another, streaming tokens to its clients. ``on_tokens``
runs on the serving loop, which is on the pipeline's critical path: a sink does no I/O there and hands
slow work to a thread of its own.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from dejavu_py.coordinator.output import write_outputs


class OutputSink(Protocol):
    def on_tokens(self, request_id: str, token_ids: Sequence[int]) -> None:
        """New output tokens of a request, in order; a request's tokens arrive before its record."""

    def on_finish(self, record: dict[str, Any]) -> None:
        """A request's final record (its ``output_ids`` are every token told before, and the truth
        should the two ever differ)."""

    def close(self) -> None:
        """Serving is over: every request has had its record."""


class JsonlSink:
    """The output file: records kept in memory and written once, in the request file's line order,
    when serving ends (atomically: a crash leaves the old file; the journal keeps what finished)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []

    def on_tokens(self, request_id: str, token_ids: Sequence[int]) -> None:
        """The file holds whole records only: nothing to do per token."""

    def on_finish(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def close(self) -> None:
        write_outputs(self.path, self.records)
