"""The HTTP layer of the front-end over a scripted coordinator (tests/serve_stack.py: the HTTP layer
only, not the pipeline): OpenAI's response and chunk shapes, SSE framing, stop strings, cancellation when
a client goes, admission (429, 503), chat through the checkpoint's template, /health, /v1/models,
/version and /metrics, and the official openai client reading our answers."""
from __future__ import annotations

import json
from dataclasses import replace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_stack import (
    INFO,
    REPLY,
    Script,
    api_error,
    sse_events,
    wait,
)

from dejavu_py.protocol.serving import Cancel, EngineState, Submit
from dejavu_py.serve.chat_template import ChatTemplate

pytest_plugins = ["serve_fixtures"]


@pytest.fixture
def coord(stack):
    stack.coord.plan = stack.coord.default_plan
    yield stack.coord
    stack.coord.plan = stack.coord.default_plan


# --- operational endpoints ----------------------------------------------------------------------------


def test_models_version_and_health(stack):
    models = stack.client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-moe"]
    assert models["data"][0]["max_model_len"] == INFO.max_model_len
    assert stack.client.get("/version").json()["version"]
    assert stack.client.get("/health").status_code == 200


def test_health_and_requests_are_503_while_the_engine_is_not_serving(stack):
    stack.coord.send(EngineState(serving=False))
    try:
        wait(lambda: not stack.ctx.engine.serving)
        r = stack.client.get("/health")
        assert r.status_code == 503 and r.json()["serving"] is False
        r = stack.client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        api_error(r, 503)
        assert r.headers["retry-after"] == "1"
    finally:
        stack.coord.send(EngineState(serving=True))
        wait(lambda: stack.ctx.engine.serving)
    assert stack.client.get("/health").status_code == 200


def test_metrics_mirror_the_engine_state_and_count_requests(stack, coord):
    coord.send(EngineState(serving=True, running=3, waiting=2, kv_usage=0.25, counters={
        "recoveries_total": {("worker_died", "standby"): 2}, "recovery_seconds": [1.5, 3.0],
        "recovery_phase_seconds": {"replay": 0.4}, "tokens_recomputed_total": 17, "workers": {"running": 3},
        "standbys_ready": 1, "replica_lag_steps": 2, "checkpoint_bytes": 4096}))
    wait(lambda: stack.ctx.engine.state.running == 3)
    r = stack.client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
    assert r.status_code == 200, r.text
    exposition = stack.client.get("/metrics")
    assert exposition.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(exposition.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
    assert samples[("dejavu:num_requests_running", ())] == 3
    assert samples[("dejavu:num_requests_waiting", ())] == 2
    assert samples[("dejavu:kv_cache_usage_perc", ())] == 0.25
    assert samples[("dejavu:engine_serving", ())] == 1
    assert samples[("dejavu:recoveries_total", (("cause", "worker_died"), ("kind", "standby")))] == 2
    assert samples[("dejavu:recovery_seconds_count", ())] == 2
    assert samples[("dejavu:recovery_seconds_sum", ())] == 4.5
    assert samples[("dejavu:recovery_seconds_last", ())] == 3.0
    assert samples[("dejavu:recovery_phase_seconds", (("phase", "replay"),))] == 0.4
    assert samples[("dejavu:tokens_recomputed_total", ())] == 17
    assert samples[("dejavu:workers", (("state", "running"),))] == 3
    assert samples[("dejavu:standbys_ready", ())] == 1
    assert samples[("dejavu:replica_lag_steps", ())] == 2
    assert samples[("dejavu:checkpoint_bytes", ())] == 4096
    assert samples[("dejavu:generation_tokens_total", ())] >= 4
    assert samples[("dejavu:prompt_tokens_total", ())] >= len(stack.ctx.tokenizer.encode("Hello"))
    assert samples[("dejavu:request_success_total", (("finished_reason", "length"),))] >= 1
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "inter_token_latency_seconds", "time_per_output_token_seconds"):
        assert samples[(f"dejavu:{hist}_count", ())] >= 1, hist


# --- completions ----------------------------------------------------------------------------------------


def test_a_completion_is_the_decoded_output_with_usage(stack, coord, tok):
    r = stack.client.post("/v1/completions", json={"model": "tiny-moe", "prompt": "Hello", "max_tokens": 5,
                                                    "return_token_ids": True})
    body = r.json()
    out = tok.encode(REPLY)[:5]
    assert body["object"] == "text_completion" and body["model"] == "tiny-moe" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["text"] == tok.decode(out) and choice["finish_reason"] == "length" and choice["index"] == 0
    assert choice["token_ids"] == out
    n_prompt = len(tok.encode("Hello"))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 5, "total_tokens": n_prompt + 5}
    sub = next(s for s in coord.submits() if s.request_id == body["id"])
    assert sub.prompt_ids == tok.encode("Hello") and sub.max_tokens == 5 and sub.temperature == 0.0


def test_sampling_fields_reach_the_coordinator(stack, coord):
    r = stack.client.post("/v1/completions", json={
        "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 11,
        "stop_token_ids": [9], "ignore_eos": True, "user": "someone"})
    assert r.status_code == 200, r.text
    sub = next(s for s in coord.submits() if s.request_id == r.json()["id"])
    assert (sub.prompt_ids, sub.temperature, sub.top_p, sub.top_k, sub.seed) == ([5, 6, 7], 0.7, 0.9, 20, 11)
    assert sub.stop_token_ids == (9,) and sub.ignore_eos


def test_several_prompts_are_choices_in_order(stack, coord, tok):
    def plan(submit: Submit) -> Script:  # the first prompt finishes last
        first = submit.prompt_ids == tok.encode("one")
        return Script(tok.encode(" first" if first else " second"), "stop", delay_s=0.05 if first else 0.0)

    coord.plan = plan
    body = stack.client.post("/v1/completions", json={"prompt": ["one", "two"], "max_tokens": 8}).json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, " first"), (1, " second")]
    assert body["usage"]["prompt_tokens"] == len(tok.encode("one")) + len(tok.encode("two"))


def test_echo_prepends_the_prompt(stack, coord, tok):
    body = stack.client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "echo": True}).json()
    assert body["choices"][0]["text"] == "Hello" + tok.decode(tok.encode(REPLY)[:3])


def test_a_stop_string_cuts_the_text_and_cancels_the_request(stack, coord):
    coord.plan = lambda s: Script(coord.tok.encode(REPLY), "length", delay_s=0.01)
    body = stack.client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 30,
                                                       "stop": ["fox", "never"]}).json()
    (choice,) = body["choices"]
    assert choice["text"] == " the quick brown " and choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == "fox"
    assert coord.wait_for(lambda m: m == Cancel(body["id"], "stop"))
    assert body["usage"]["completion_tokens"] < len(coord.tok.encode(REPLY))


def test_an_engine_error_record_is_a_500(stack, coord):
    coord.plan = lambda s: Script([], error="the KV cache cannot hold this request")
    err = api_error(stack.client.post("/v1/completions", json={"prompt": "Hello"}), 500)
    assert "KV cache" in err["message"]


# --- streaming --------------------------------------------------------------------------------------------


def test_a_stream_is_sse_chunks_a_finish_a_usage_chunk_and_done(stack, coord, tok):
    coord.plan = lambda s: Script(tok.encode(" héllo wörld 日本"), "stop")
    r = stack.client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 30, "stream": True,
                                                    "stream_options": {"include_usage": True}})
    events = sse_events(r)
    *chunks, last = events
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == " héllo wörld 日本"
    assert not any("\ufffd" in c["choices"][0]["text"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("stop") == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == len(tok.encode(" héllo wörld 日本"))
    assert len({c["id"] for c in events}) == 1


def test_a_stream_of_several_prompts_carries_each_choice_by_index(stack, coord, tok):
    coord.plan = lambda s: Script(tok.encode(REPLY)[:6], "length", delay_s=0.01)
    events = sse_events(stack.client.post("/v1/completions", json={"prompt": ["one", "two"], "max_tokens": 6,
                                                                    "stream": True}))
    for index in (0, 1):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == tok.decode(tok.encode(REPLY)[:6])
        assert [c["finish_reason"] for c in mine].count("length") == 1 and mine[-1]["finish_reason"] == "length"


def test_an_error_during_a_stream_is_an_error_event_then_done(stack, coord):
    coord.plan = lambda s: Script([], error="a stage failed for good")
    events = sse_events(stack.client.post("/v1/completions", json={"prompt": "Hi", "stream": True}))
    assert "a stage failed" in events[-1]["error"]["message"]


def test_a_client_that_disconnects_cancels_its_stream(stack, coord, tok):
    coord.plan = lambda s: Script(tok.encode(REPLY), "length", delay_s=0.05)
    with stack.client.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 30, "stream": True}) as r:
        line = next(ln for ln in r.iter_lines() if ln.startswith("data: "))
        rid = json.loads(line[6:])["id"]
    assert coord.wait_for(lambda m: m == Cancel(rid, "abort"), timeout=10)


def test_a_client_that_disconnects_cancels_its_whole_request(stack, coord, tok):
    coord.plan = lambda s: Script(tok.encode(REPLY), "length", delay_s=0.2)
    with pytest.raises(httpx.ReadTimeout):
        stack.client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 20}, timeout=0.5)
    sub = coord.wait_for(lambda m: isinstance(m, Submit) and m.max_tokens == 20 and m.prompt_ids == tok.encode("Hi"))
    assert coord.wait_for(lambda m: m == Cancel(sub.request_id, "abort"), timeout=10)


def test_more_than_max_waiting_in_flight_is_429(stack, coord, tok, monkeypatch):
    monkeypatch.setattr(stack.ctx, "config", replace(stack.ctx.config, max_waiting=1))
    coord.plan = lambda s: Script(tok.encode(REPLY), "length", delay_s=0.1)
    with stack.client.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 20, "stream": True}) as r:
        lines = r.iter_lines()  # held: dropping it would close the connection, which cancels the request
        assert next(lines).startswith("data: ")
        assert stack.ctx.engine.in_flight == 1
        busy = stack.client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        api_error(busy, 429)
        assert busy.headers["retry-after"] == "1"


# --- chat ---------------------------------------------------------------------------------------------------


def test_chat_without_a_template_is_a_400_naming_it(stack, coord):
    err = api_error(stack.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}),
                 400, "messages")
    assert "chat template" in err["message"] and err["code"] == "chat_template_missing"


def test_chat_renders_the_template_and_answers_a_message(stack, coord, tok, chat_ckpt, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr(stack.ctx, "chat", ChatTemplate(chat_ckpt))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    body = stack.client.post("/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 4}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": tok.decode(tok.encode(REPLY)[:4])}
    expected = AutoTokenizer.from_pretrained(chat_ckpt).apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        add_generation_prompt=True, tokenize=False)
    sub = next(s for s in coord.submits() if s.request_id == body["id"])
    assert sub.prompt_ids == tok.encode(expected) and sub.max_tokens == 4


def test_chat_messages_too_long_for_the_model_are_a_400_on_messages(stack, chat_ckpt, monkeypatch):
    monkeypatch.setattr(stack.ctx, "chat", ChatTemplate(chat_ckpt))
    long = [{"role": "user", "content": "the quick brown fox " * 20}]
    err = api_error(stack.client.post("/v1/chat/completions", json={"messages": long}), 400, "messages")
    assert err["code"] == "context_length_exceeded"
    short = [{"role": "user", "content": "hi"}]
    err = api_error(stack.client.post("/v1/chat/completions", json={"messages": short, "max_tokens": 60}), 400,
                    "messages")
    assert "maximum context length" in err["message"]


def test_chat_stream_starts_with_the_role(stack, coord, tok, chat_ckpt, monkeypatch):
    monkeypatch.setattr(stack.ctx, "chat", ChatTemplate(chat_ckpt))
    events = sse_events(stack.client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == tok.decode(tok.encode(REPLY)[:6])
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_the_official_client_reads_our_answers(stack, coord, tok, chat_ckpt, monkeypatch):
    import openai

    monkeypatch.setattr(stack.ctx, "chat", ChatTemplate(chat_ckpt))
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0)
    done = client.completions.create(model="tiny-moe", prompt="Hello", max_tokens=4, extra_body={"top_k": 7})
    assert done.choices[0].text == tok.decode(tok.encode(REPLY)[:4]) and done.usage.completion_tokens == 4
    assert next(s for s in coord.submits() if s.request_id == done.id).top_k == 7
    stream = client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == tok.decode(tok.encode(REPLY)[:5])
    assert chunks[-1].usage.completion_tokens == 5
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="Hello")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-moe", prompt="Hello", max_tokens=0)
