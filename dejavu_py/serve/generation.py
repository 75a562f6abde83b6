"""One prompt's request from its Submit to its end, as a stream of text events: tokens become final
text (serve/detokenize.py), a stop string ends it early (the coordinator is told to stop: Cancel
"stop"), and a reader that goes away ends it too (Cancel "abort"), whatever the reason it stopped
reading: the generator closed, or its task cancelled."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from dejavu_py.protocol.serving import ServerInfo, Submit
from dejavu_py.serve.detokenize import Detokenizer, TextDelta
from dejavu_py.serve.engine_client import EngineClient
from dejavu_py.serve.metrics import ServeMetrics
from dejavu_py.serve.prompts import Prompt
from dejavu_py.tokenizer import Tokenizer


@dataclass
class Event:
    """New text of one choice; the last event of a choice has its finish_reason. A whole choice is one
    event too (serve/responses.py's ``collect``)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    """The stop string, or the stop token id (not the model's end of sequence), that ended the output."""


@dataclass
class Generation:
    """Runs one request (``events``) and counts its tokens."""

    index: int
    """The choice's index in the response."""
    submit: Submit
    prompt: Prompt
    engine: EngineClient
    tokenizer: Tokenizer
    info: ServerInfo
    metrics: ServeMetrics
    stops: list[str]
    include_stop: bool = False
    echo: bool = False
    context_tokens: int = 5
    t_arrival: float = field(default_factory=time.time)
    output_ids: list[int] = field(default_factory=list)
    record: dict[str, Any] | None = None
    done: bool = False

    @property
    def request_id(self) -> str:
        return self.submit.request_id

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt.ids)

    async def events(self) -> AsyncIterator[Event]:
        """The choice's text as it becomes final; the request is cancelled if the iteration is left early."""
        detok = Detokenizer(self.tokenizer, self.prompt.ids[-self.context_tokens :] if self.context_tokens else (),
                            self.stops, self.include_stop)
        stream = self.engine.submit(self.submit)
        t_first: float | None = None
        t_last: float | None = None
        try:
            if self.echo:
                yield Event(self.index, self.prompt.text if self.prompt.text is not None
                            else self.tokenizer.decode(self.prompt.ids))
            async for batch in stream:
                if t_first is None:
                    t_first = batch.time
                    self.metrics.first_token(self.prompt_tokens, batch.time - self.t_arrival)
                event = self._take(batch.token_ids, detok)
                self.metrics.tokens(len(event.token_ids), None if t_last is None else batch.time - t_last)
                t_last = batch.time
                if event.finish_reason is not None:
                    self.engine.cancel(self.request_id, "stop")
                    self._end(event.finish_reason, t_first, t_last)
                    yield event
                    return
                if event.text or event.token_ids:
                    yield event
            self.record = stream.record
            tail = detok.finish()
            reason = "stop" if tail.stop is not None else str((self.record or {}).get("finish_reason", "length"))
            self._end(reason, t_first, t_last)
            yield Event(self.index, tail.text, [], reason, tail.stop if tail.stop is not None else self._stop_token())
        finally:
            if not self.done:
                self.done = True
                self.engine.cancel(self.request_id, "abort")

    def _take(self, ids: list[int], detok: Detokenizer) -> Event:
        """Token by token, so that a stop string ends the output at the token that completed it."""
        event = Event(self.index)
        for t in ids:
            self.output_ids.append(t)
            event.token_ids.append(t)
            delta: TextDelta = detok.add([t])
            event.text += delta.text
            if delta.stop is not None:
                event.finish_reason, event.stop_reason = "stop", delta.stop
                break
        return event

    def _stop_token(self) -> int | None:
        last = self.output_ids[-1] if self.output_ids else None
        if last is not None and last in self.submit.stop_token_ids and last not in self.info.eos_token_ids:
            return last
        return None

    def _end(self, reason: str, t_first: float | None, t_last: float | None) -> None:
        self.done = True
        timings = (self.record or {}).get("timings") or {}
        queued = timings.get("queued_s")
        decode = None if t_first is None or t_last is None else t_last - t_first
        self.metrics.finished(reason, len(self.output_ids), time.time() - self.t_arrival, decode,
                              float(queued) if isinstance(queued, (int, float)) else None)
