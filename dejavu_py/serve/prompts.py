"""The prompts of a /v1/completions request: text or token ids, one or several, each checked and
tokenized into the token ids the coordinator gets."""
from __future__ import annotations

from dataclasses import dataclass

from dejavu_py.protocol.serving import ServerInfo
from dejavu_py.serve.api_errors import bad_request
from dejavu_py.serve.params import check_token_ids
from dejavu_py.tokenizer import Tokenizer


@dataclass(frozen=True)
class Prompt:
    """One prompt, tokenized."""

    ids: list[int]
    text: str | None = None
    """The text the client gave (None for token ids)."""


def completion_prompts(prompt: str | list[str] | list[int] | list[list[int]], tokenizer: Tokenizer,
                       info: ServerInfo) -> list[Prompt]:
    """One Prompt per choice: a string, each string of a list, a token-id list, or each of a list of them."""
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif not prompt:
        raise bad_request("field 'prompt': must not be empty", "prompt")
    elif all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]  # type: ignore[arg-type]
    else:
        items = list(prompt)  # type: ignore[arg-type]
    return [_one(item, tokenizer, info, f"prompt[{i}]" if len(items) > 1 else "prompt") for i, item in enumerate(items)]


def _one(item: str | list[int], tokenizer: Tokenizer, info: ServerInfo, where: str) -> Prompt:
    if isinstance(item, str):
        ids = tokenizer.encode(item)
        if not ids:
            raise bad_request(f"field '{where}': the text encodes to no tokens; give a non-empty prompt", "prompt")
        check_token_ids(ids, info, "prompt")
        return Prompt(ids, item)
    if not item:
        raise bad_request(f"field '{where}': a token-id prompt must not be empty", "prompt")
    check_token_ids(item, info, "prompt")
    return Prompt(list(item))
