"""Streaming detokenization: a UTF-8 character split over tokens is never shown half, a stop string
that spans tokens ends the text before it, and a possible stop-string prefix waits until it is decided."""
from __future__ import annotations

import pytest

from dejavu_py.serve.detokenize import (
    REPLACEMENT,
    Detokenizer,
    IncrementalDecoder,
    StopStringFilter,
)

pytest_plugins = ["serve_fixtures"]  # tok: the tiny checkpoints' tokenizer


def _stream(detok: Detokenizer, ids: list[int]) -> list[str]:
    return [detok.add([t]).text for t in ids] + [detok.finish().text]


@pytest.mark.parametrize("text", ["héllo wörld", "日本語 and more 日本", "emoji 🦊 fox 🐶!", "plain ascii text"])
def test_split_characters_are_held_until_whole(tok, text):
    ids = tok.encode(text)
    pieces = _stream(Detokenizer(tok), ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any(REPLACEMENT in p for p in pieces), pieces


def test_a_character_split_over_three_tokens_appears_with_its_last_byte(tok):
    ids = tok.encode("日")
    assert len(ids) == 3 and all(tok.decode([i]) == REPLACEMENT for i in ids)  # one byte per token
    dec = IncrementalDecoder(tok)
    assert [dec.add([i]) for i in ids] == ["", "", "日"]


def test_an_incomplete_character_at_the_end_is_flushed_as_replacement(tok):
    first_byte = tok.encode("é")[0]
    dec = IncrementalDecoder(tok)
    assert dec.add([first_byte]) == ""
    assert dec.flush() == REPLACEMENT


def test_prompt_context_keeps_a_leading_space_that_a_tokenizer_drops_at_text_start():
    class SentencePieceLike:
        """Decodes like SentencePiece: a leading space of the whole text is dropped."""

        pieces = {1: " Hello", 2: " world", 3: "!"}

        def decode(self, ids):
            return "".join(self.pieces[i] for i in ids).lstrip(" ")

    fake = SentencePieceLike()
    assert IncrementalDecoder(fake).add([2]) == "world"  # alone, the space is lost
    dec = IncrementalDecoder(fake, context_ids=[1])
    assert [dec.add([2]), dec.add([3])] == [" world", "!"]


def test_a_stop_string_across_tokens_ends_the_text_before_it(tok):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    detok = Detokenizer(tok, stops=["brown fox"])
    shown = []
    for i, t in enumerate(ids):
        delta = detok.add([t])
        shown.append(delta.text)
        if delta.stop is not None:
            break
    assert delta.stop == "brown fox" and detok.stopped == "brown fox"
    assert "".join(shown) == "The quick "
    assert len(tok.decode(ids[: i + 1])) >= len("The quick brown fox")  # it ended at the completing token
    assert len(tok.decode(ids[:i])) < len("The quick brown fox")
    assert detok.add(ids[i + 1 :]).text == "" and detok.finish().text == ""


def test_include_stop_str_keeps_the_stop_string(tok):
    detok = Detokenizer(tok, stops=["fox"], include_stop=True)
    out = "".join(detok.add([t]).text for t in tok.encode("The quick brown fox jumps"))
    assert out == "The quick brown fox"


def test_a_possible_stop_prefix_is_held_then_shown_when_it_cannot_match():
    f = StopStringFilter(["fox!"])
    assert f.feed("the fo").text == "the "  # "fo" could begin "fox!"
    assert f.feed("x").text == ""  # "fox" still could
    assert f.feed(" jumps").text == "fox jumps"  # "fox " cannot
    assert f.feed("fo").text == ""
    assert f.feed("", final=True).text == "fo"  # the output ended: nothing can match any more
    assert f.matched is None


def test_the_earliest_of_several_stop_strings_wins():
    f = StopStringFilter(["world", "o w"])
    delta = f.feed("hello world")
    assert (delta.text, delta.stop) == ("hell", "o w")


def test_a_stop_string_completed_at_finish_still_cuts(tok):
    detok = Detokenizer(tok, stops=["dog."])
    ids = tok.encode("the lazy dog.")
    shown = "".join(detok.add([t]).text for t in ids[:-1])
    end = detok.add(ids[-1:])
    assert shown + end.text == "the lazy " and end.stop == "dog."


def test_held_text_is_released_when_the_output_ends(tok):
    detok = Detokenizer(tok, stops=["lazy cat"])
    ids = tok.encode("over the lazy")
    pieces = _stream(detok, ids)
    assert "".join(pieces[:-1]) == "over the "  # "lazy" may begin "lazy cat"
    assert pieces[-1] == "lazy" and detok.stopped is None
