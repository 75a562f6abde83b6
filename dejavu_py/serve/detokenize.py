"""Output tokens to text as a stream: only text that is final leaves, so a streaming client never sees a
character that a later token changes, nor the beginning of a stop string that turns out to end it.

Two things are held back. A byte-level tokenizer may split one UTF-8 character over several tokens;
until the last arrives the decoded text ends in U+FFFD, so text ending in U+FFFD waits for the next
token. And when the text so far ends with the first characters of a stop string, those characters wait
until the string either completes (the output ends before it) or cannot (they are shown).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

REPLACEMENT = "\ufffd"
"""What a decoder writes for bytes that are not (yet) a whole UTF-8 character."""


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class TextDelta:
    """Text that became final with some tokens; ``stop`` is the stop string that ended the output."""

    text: str
    stop: str | None = None


class IncrementalDecoder:
    """Token ids in, the text they add out, never a split character.

    Decodes a short window (``ids[prefix:]``) rather than the whole output each time, and takes the
    difference with the window's already-shown part (``ids[prefix:read]``): decoding a token alone can
    differ from decoding it in context (a leading space some tokenizers drop at the start of a text),
    so the window starts a few tokens back, at the last point where the text was complete.
    """

    def __init__(self, tokenizer: Decoder, context_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(context_ids)
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, ids: Sequence[int]) -> str:
        """The text that ``ids`` complete ("" while it ends in a split character)."""
        self._ids.extend(int(t) for t in ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held (the output ended: an incomplete character is shown as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        shown = self._tok.decode(self._ids[self._prefix : self._read])
        full = self._tok.decode(self._ids[self._prefix :])
        if not final and (len(full) <= len(shown) or full.endswith(REPLACEMENT)):
            return ""
        delta = full[len(shown) :] if full.startswith(shown) else full[_common_prefix(full, shown) :]
        self._prefix, self._read = self._read, len(self._ids)
        return delta


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class StopStringFilter:
    """Text in, the part that is final out: cut at the first stop string, holding back any tail that
    could still become one."""

    def __init__(self, stops: Sequence[str], include_stop: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str, final: bool = False) -> TextDelta:
        """The final part of what has come so far; after a match, nothing more."""
        if self.matched is not None:
            return TextDelta("")
        buf = self._held + text
        hit = self._first_match(buf)
        if hit is not None:
            pos, stop = hit
            self.matched, self._held = stop, ""
            return TextDelta(buf[: pos + (len(stop) if self.include_stop else 0)], stop)
        keep = 0 if final else self._partial_tail(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return TextDelta(buf[: len(buf) - keep])

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self.stops:
            pos = buf.find(stop)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best

    def _partial_tail(self, buf: str) -> int:
        """Length of the longest end of ``buf`` that begins some stop string (without completing it)."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), longest, -1):
                if buf.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class Detokenizer:
    """One request's output: tokens in, final text out, ended by a stop string or by ``finish``."""

    def __init__(self, tokenizer: Decoder, context_ids: Sequence[int] = (), stops: Sequence[str] = (),
                 include_stop: bool = False) -> None:
        self._decoder = IncrementalDecoder(tokenizer, context_ids)
        self._filter = StopStringFilter(stops, include_stop)

    @property
    def stopped(self) -> str | None:
        """The stop string that ended the output, if one did."""
        return self._filter.matched

    def add(self, ids: Sequence[int]) -> TextDelta:
        return self._filter.feed(self._decoder.add(ids))

    def finish(self) -> TextDelta:
        """The rest of the text once no token will come (a stop string can still match in it)."""
        return self._filter.feed(self._decoder.flush(), final=True)
