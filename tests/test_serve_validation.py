"""Requests the front-end refuses, each a 4xx in OpenAI's error shape naming the field at fault, over
a scripted coordinator (tests/serve_stack.py: the HTTP layer only)."""
from __future__ import annotations

import pytest
from serve_stack import api_error

pytest_plugins = ["serve_fixtures"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "top_k": -2}, "top_k"),
    ({"prompt": "hi", "seed": -1}, "seed"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -5}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "hi", "n": 2}, "n"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "stop": 5}, "stop"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "stop_token_ids": [99999]}, "stop_token_ids"),
    ({"prompt": "hi", "logprobs": 2}, "logprobs"),
    ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": "x" * 30, "max_tokens": 40}, "prompt"),  # prompt + max_tokens over max_model_len
    ({"prompt": [5] * 41, "max_tokens": 1}, "prompt"),  # the prompt alone over max_prompt_tokens
    ({}, "prompt"),
])
def test_invalid_completion_fields_are_400_naming_the_field(stack, body, param):
    err = api_error(stack.client.post("/v1/completions", json=body), 400, param)
    assert err["type"] == "invalid_request_error"
    assert param in err["message"] or "context length" in err["message"] or "KV cache" in err["message"], err


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
])
def test_invalid_chat_fields_are_400_naming_the_field(stack, body, param):
    api_error(stack.client.post("/v1/chat/completions", json=body), 400, param)


def test_invalid_json_and_non_objects_are_400(stack):
    err = api_error(stack.client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
                 400)
    assert "JSON" in err["message"]
    api_error(stack.client.post("/v1/completions", json=["a list"]), 400)


def test_an_unknown_model_is_404_model_not_found(stack):
    err = api_error(stack.client.post("/v1/completions", json={"model": "gpt-4", "prompt": "hi"}), 404, "model")
    assert err["code"] == "model_not_found" and "gpt-4" in err["message"]


def test_an_unknown_route_is_404_in_the_same_shape(stack):
    api_error(stack.client.get("/v1/nothing"), 404)
