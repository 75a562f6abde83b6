"""Every request of a run, from its arrival to its answer.

A request the journal has finished before (an earlier attempt of the same job) is answered from it;
the others become sequences for the scheduler. Their new tokens go to the output sink as step results
bring them, and every end (a success, a bad line, a cancellation, a request the run could not finish)
goes to the journal when it is this attempt's success, to the tally, and to the sink. Only sequences
not answered yet are kept: an online server's ledger does not grow with every request it ever served.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dejavu_py.coordinator.output import error_record, sequence_record
from dejavu_py.coordinator.progress import Tally
from dejavu_py.coordinator.sequence import Sequence

if TYPE_CHECKING:
    from dejavu_py.coordinator.journal import Journal
    from dejavu_py.coordinator.request import Request
    from dejavu_py.coordinator.sink import OutputSink
    from dejavu_py.tokenizer import Tokenizer


class Ledger:
    def __init__(self, journal: Journal, sink: OutputSink, tokenizer: Tokenizer | None) -> None:
        self.journal, self.sink, self.tokenizer = journal, sink, tokenizer
        self.live: dict[int, Sequence] = {}
        """Requests being served (not answered yet), by seq_id: 0, 1, ... in arrival order."""
        self.by_id: dict[str, Sequence] = {}
        """The same, by request id."""
        self.tally = Tally()
        self.prompt_tokens = 0
        """Prompt tokens of every request served by this attempt."""
        self._generated = 0  # output tokens of the requests answered
        self._next_id = 0

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
            if r.id in self.by_id:
                msg = f"request id {r.id!r} is being served already: give every request an id of its own"
                self.answer(error_record(r.line, r.id, msg), journal=False)
                continue
            seq = Sequence(self._next_id, r, t_arrival=t0 + r.arrival_s)
            self._next_id += 1
            self.live[seq.seq_id] = self.by_id[r.id] = seq
            self.prompt_tokens += seq.prompt_len
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
        live, tell = self.live, self.sink.on_tokens
        for sid in seq_ids:
            seq = live.get(sid)  # None: answered already (cancelled, or the step ahead's extra token)
            if seq is not None and len(seq.output_ids) > seq.told:  # the usual case: one new token
                tell(seq.request.id, seq.untold())

    def finished(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.tally.served += 1
            self._forget(seq)
            self.answer(sequence_record(seq, self.tokenizer))

    def cancelled(self, seq: Sequence, reason: str) -> None:
        """Its client cancelled it (the driver has let it go): its record now, with the tokens told
        so far; ``reason`` is "abort", or "stop" when the client matched a stop string."""
        del seq.output_ids[seq.told :]
        seq.finish_reason = reason if reason in ("abort", "stop") else "abort"
        self.finished([seq])

    def _forget(self, seq: Sequence) -> None:
        self.live.pop(seq.seq_id, None)
        self.by_id.pop(seq.request.id, None)
        self._generated += len(seq.output_ids)

    def abandon(self, rest: list[Request], t0: float, why: str) -> None:
        """The run ends early: every request not answered, ``rest`` (those yet to arrive) included,
        gets an error record saying ``why``."""
        self._take(rest, t0)
        for seq in list(self.live.values()):
            self._forget(seq)
            self.answer(error_record(seq.request.line, seq.request.id, f"not finished: {why}"), journal=False)

    @property
    def generated_tokens(self) -> int:
        """Output tokens of every request of this attempt, answered or not."""
        return self._generated + sum(len(s.output_ids) for s in self.live.values())

    @property
    def answered(self) -> int:
        """Requests served or resumed so far (the progress bar's count)."""
        return self.tally.served + self.tally.resumed
