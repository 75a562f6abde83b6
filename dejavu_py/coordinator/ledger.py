"""Every request of a run, from its arrival to its answer.

A request the journal has finished before (an earlier attempt of the same job) is answered from it;
the others become sequences for the scheduler. Their new tokens go to the output sink as step results
bring them, and every end (a success, a bad line, a request the run could not finish) goes to the
journal when it is this attempt's success, to the tally, and to the sink.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dejavu_py.coordinator.output import error_record, sequence_record
from dejavu_py.coordinator.progress import Tally
from dejavu_py.coordinator.sequence import Sequence, Status

if TYPE_CHECKING:
    from dejavu_py.coordinator.journal import Journal
    from dejavu_py.coordinator.request import Request
    from dejavu_py.coordinator.sink import OutputSink
    from dejavu_py.tokenizer import Tokenizer


class Ledger:
    def __init__(self, journal: Journal, sink: OutputSink, tokenizer: Tokenizer | None) -> None:
        self.journal, self.sink, self.tokenizer = journal, sink, tokenizer
        self.seqs: list[Sequence] = []
        """Every request served by this attempt; a sequence's seq_id is its index."""
        self.tally = Tally()

    def arrived(self, requests: list[Request], t0: float) -> list[Sequence]:
        """New requests (``arrival_s`` counted from ``t0``): the sequences to serve."""
        fresh = self._take(requests, t0)
        if fresh:
            self.journal.accept([s.request.id for s in fresh])
        return fresh

    def _take(self, requests: list[Request], t0: float) -> list[Sequence]:
        fresh: list[Sequence] = []
        for r in requests:
            done = self.journal.finished.get(r.id)
            if done is not None:
                self.tally.resumed += 1
                self.answer(done, journal=False)
                continue
            seq = Sequence(len(self.seqs), r, t_arrival=t0 + r.arrival_s)
            self.seqs.append(seq)
            fresh.append(seq)
        return fresh

    def answer(self, record: dict[str, Any], journal: bool = True) -> None:
        """A request's end: into the journal (a success of this attempt), the tally and the sink."""
        if journal:
            self.journal.finish(record)
        self.tally.count(record)
        self.sink.on_finish(record)

    def tokens(self, seq_ids: list[int], num_tokens: int) -> None:
        """A step result: the sink learns the new tokens of its sequences (none for the result of a
        plan a recovery dropped, or the extra token of a sequence that already stopped)."""
        self.tally.tokens += num_tokens
        seqs, tell = self.seqs, self.sink.on_tokens
        for sid in seq_ids:
            seq = seqs[sid]
            if len(seq.output_ids) > seq.told:  # the usual case: one new token
                tell(seq.request.id, seq.untold())

    def finished(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.tally.served += 1
            self.answer(sequence_record(seq, self.tokenizer))

    def abandon(self, rest: list[Request], t0: float, why: str) -> None:
        """The run ends early: every request not finished, ``rest`` (those yet to arrive) included,
        gets an error record saying ``why``."""
        self._take(rest, t0)
        for seq in self.seqs:
            if seq.status is not Status.FINISHED:
                self.answer(error_record(seq.request.line, seq.request.id, f"not finished: {why}"), journal=False)

    @property
    def answered(self) -> int:
        """Requests served or resumed so far (the progress bar's count)."""
        return self.tally.served + self.tally.resumed
