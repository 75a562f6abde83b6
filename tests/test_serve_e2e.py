"""End to end: ``python -m dejavu_py serve --nproc-per-node 3`` on the tiny checkpoint (CPU), spoken to with
the official openai client: the batch command's exact tokens, OpenAI's errors, cancellation, a stage
worker killed while 16 streams are open, and a bounded load. One server for the module; a second one
only for the full queue's 429."""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from e2e import ROOT, dejavu, logs_of, write_requests
from make_checkpoint import make_checkpoint
from prometheus_client.parser import text_string_to_metric_families
from serve_e2e_stack import Server, serving, stage_worker_pid

from dejavu_py import cli

WAIT_S = 60.0
"""The longest any one wait of these tests may take (a request, a stream, a metric to settle)."""
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
FT_STREAMS, FT_TOKENS = 16, 150
GREEDY = {"temperature": 0.0, "top_p": 1.0}
SEEDED = {"temperature": 0.8, "top_p": 1.0, "seed": 7}


def _prompts(vocab: int) -> dict[str, list[int]]:
    rng = random.Random(11)
    out = {"greedy": [rng.randrange(3, vocab) for _ in range(9)], "seeded": [rng.randrange(3, vocab) for _ in range(7)]}
    out.update({f"ft{i}": [rng.randrange(3, vocab) for _ in range(rng.randint(3, 12))] for i in range(FT_STREAMS)})
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = make_checkpoint(tmp_path_factory.mktemp("ck") / "olmoe", family="olmoe", seed=4)
    cfg_path = path / "tokenizer_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "chat_template": TEMPLATE}))
    return path


@pytest.fixture(scope="module")
def prompts(ckpt) -> dict[str, list[int]]:
    return _prompts(json.loads((ckpt / "config.json").read_text())["vocab_size"])


@pytest.fixture(scope="module")
def batch(ckpt, prompts, tmp_path_factory) -> dict[str, list[int]]:
    """The batch command's output ids of the same requests, run once before the server starts."""
    root = tmp_path_factory.mktemp("batch")
    reqs = [{"id": "greedy", "input_ids": prompts["greedy"], "max_new_tokens": 16, **GREEDY},
            {"id": "seeded", "input_ids": prompts["seeded"], "max_new_tokens": 16, **SEEDED}]
    reqs += [{"id": f"ft{i}", "input_ids": prompts[f"ft{i}"], "max_new_tokens": FT_TOKENS, "ignore_eos": True, **GREEDY}
             for i in range(FT_STREAMS)]
    out = root / "out.jsonl"
    proc = dejavu(["--nproc-per-node", "3", "--config", str(ROOT / "configs/tiny-cpu.yaml"), "--model", str(ckpt),
                   "--prompts", str(write_requests(root / "reqs.jsonl", reqs)), "--output", str(out),
                   "--run-dir", str(root / "run"), "--no-progress"])
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\n{logs_of(root / 'run')}"
    return {r["id"]: r["output_ids"] for r in map(json.loads, out.read_text().splitlines())}


@pytest.fixture(scope="module")
def server(ckpt, batch, tmp_path_factory):
    """--max-batch-size 8: the 16 streams of the fault test all run at once (two per microbatch's batch)."""
    with serving(ckpt, tmp_path_factory.mktemp("serve") / "run", "--max-waiting", "256",
                 "--max-batch-size", "8") as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", timeout=WAIT_S, max_retries=0)


def metrics(server: Server) -> dict[str, float]:
    """/metrics as {sample name with labels: value}, parsed by prometheus_client's own parser."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def settles(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# ---------------------------------------------------------------- the command line


def test_serve_subcommand_sets_serving_and_needs_no_prompts(ckpt):
    cfg, _ = cli.parse(["serve", "--model", str(ckpt), "--port", "8123"])
    assert cfg.serve.enabled and cfg.prompts is None and cfg.serve.port == 8123
    batch_cfg, _ = cli.parse(["--model", str(ckpt), "--prompts", "r.jsonl"])
    assert not batch_cfg.serve.enabled and batch_cfg.prompts == Path("r.jsonl")


@pytest.mark.parametrize("argv, needle", [
    (["serve", "--model", "m", "--prompts", "r.jsonl"], "--prompts r.jsonl: a server takes its requests over HTTP"),
    (["--model", "m"], "--prompts is required"),
    (["serve"], "--model is required"),
])
def test_serve_subcommand_errors_are_one_line(argv, needle):
    with pytest.raises(cli.UserError, match=needle):
        cli.parse(argv)


def test_help_names_the_subcommand_and_its_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "'serve'" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m dejavu_py serve")
    assert "serving (online" in out and all(f in out for f in ("--host", "--port", "--served-model-name", "--max-waiting"))


def test_the_front_end_refuses_a_port_in_use_before_starting(ckpt, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = dejavu(["serve", "--nproc-per-node", "3", "--model", str(ckpt), "--run-dir", str(tmp_path / "run"),
                    "--port", str(busy.getsockname()[1])], timeout=WAIT_S)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: --host 127.0.0.1 --port")


# ---------------------------------------------------------------- one server for the module


def test_health_models_version(server):
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert [m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]] == ["tiny"]
    assert httpx.get(f"{server.url}/version", timeout=10).json()["version"]


def test_completions_and_chat_streamed_and_not(client):
    full = client.completions.create(model="tiny", prompt="Hello there", max_tokens=8, **GREEDY)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 8
    parts = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="Hello there", max_tokens=8,
                                                                   stream=True, **GREEDY) if c.choices]
    assert "".join(parts) == full.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          **GREEDY)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 6
    streamed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                              stream=True, **GREEDY)
    deltas = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    assert "".join(deltas) == chat.choices[0].message.content


def test_include_usage_gives_a_usage_chunk(client, prompts):
    chunks = list(client.completions.create(model="tiny", prompt=prompts["greedy"], max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert all(c.usage is None for c in chunks[:-1]) and not chunks[-1].choices
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (9, 5, 14)


def test_a_stop_string_ends_the_text_before_it(client):
    full = client.completions.create(model="tiny", prompt="Once upon", max_tokens=16, **GREEDY).choices[0].text
    k = next(i for i in range(2, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    stop = full[k:k + 2]
    r = client.completions.create(model="tiny", prompt="Once upon", max_tokens=16, stop=[stop], **GREEDY)
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("name, fields", [("greedy", GREEDY), ("seeded", SEEDED)])
def test_the_batch_commands_tokens(client, prompts, batch, name, fields):
    r = client.completions.create(model="tiny", prompt=prompts[name], max_tokens=16, extra_body={"return_token_ids": True},
                                  **fields)
    assert r.choices[0].token_ids == batch[name]
    streamed = client.completions.create(model="tiny", prompt=prompts[name], max_tokens=16, stream=True,
                                         extra_body={"return_token_ids": True}, **fields)
    assert [t for c in streamed if c.choices for t in (c.choices[0].token_ids or [])] == batch[name]


def test_bad_requests_get_openais_errors(server, client):
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    cases = [(openai.NotFoundError, {"model": "other"}, "model"),
             (openai.BadRequestError, {"prompt": [5] * 300}, "prompt"),
             (openai.BadRequestError, {"max_tokens": -1}, "max_tokens"),
             (openai.BadRequestError, {"n": 2}, "n")]
    for error, fields, param in cases:
        with pytest.raises(error) as e:
            client.completions.create(**{"model": "tiny", "prompt": "Hi", "max_tokens": 4, **fields})
        assert e.value.body["param"] == param and e.value.body["message"] and e.value.body["type"], e.value.body


def test_a_cancelled_stream_frees_its_blocks(server, client):
    stream = client.completions.create(model="tiny", prompt="Hello", max_tokens=FT_TOKENS, stream=True,
                                       extra_body={"ignore_eos": True}, **GREEDY)
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].text)
        if got >= 3:
            break
    assert metrics(server)["dejavu:num_requests_running"] >= 1
    stream.close()
    assert settles(lambda: (m := metrics(server))["dejavu:kv_cache_usage_perc"] == 0
                   and m["dejavu:num_requests_running"] == 0, 3.0), metrics(server)


def test_64_concurrent_streams(client):
    def one(i: int) -> tuple[int, str | None]:
        chunks = list(client.completions.create(model="tiny", prompt=f"Story {i}:", max_tokens=4, stream=True,
                                                extra_body={"ignore_eos": True, "return_token_ids": True}, **GREEDY))
        choices = [c.choices[0] for c in chunks if c.choices]
        return sum(len(c.token_ids or []) for c in choices), choices[-1].finish_reason

    t0 = time.monotonic()
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64), timeout=WAIT_S * 2))
    assert all(reason == "length" and n == 4 for n, reason in results), results
    assert time.monotonic() - t0 < WAIT_S * 2


def test_a_stage_worker_killed_while_16_streams_are_open(server, client, prompts, batch):
    got: dict[int, list[list[int]]] = {i: [] for i in range(FT_STREAMS)}
    ends: dict[int, str | None] = {}
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        try:
            for c in client.completions.create(model="tiny", prompt=prompts[f"ft{i}"], max_tokens=FT_TOKENS, stream=True,
                                               extra_body={"ignore_eos": True, "return_token_ids": True}, **GREEDY):
                if c.choices:
                    got[i].append(c.choices[0].token_ids or [])
                    if c.choices[0].finish_reason is not None:
                        ends[i] = c.choices[0].finish_reason
        except BaseException as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(FT_STREAMS)]
    for t in threads:
        t.start()
    assert settles(lambda: all(sum(map(len, g)) >= 3 for g in got.values()) or errors, WAIT_S), (errors, server.console())
    assert not ends, f"streams ended before the kill: {ends}"
    os.kill(stage_worker_pid(server.run_dir, "s1"), signal.SIGKILL)
    health = []
    while any(t.is_alive() for t in threads):
        health.append(httpx.get(f"{server.url}/health", timeout=10).status_code)
        time.sleep(0.1)
        assert len(health) < WAIT_S * 20, "the streams did not finish"
    assert not errors, errors
    assert set(health) == {200}, health
    for i in range(FT_STREAMS):
        assert ends.get(i) == "length", (i, ends)
        assert [t for part in got[i] for t in part] == batch[f"ft{i}"], i
    m = metrics(server)
    assert sum(v for k, v in m.items() if k.startswith("dejavu:recoveries_total")) >= 1, m


# ---------------------------------------------------------------- a full queue


def test_a_full_queue_is_429_with_retry_after(ckpt, tmp_path):
    with serving(ckpt, tmp_path / "run", "--max-waiting", "1") as s:
        first = threading.Thread(target=lambda: httpx.post(
            f"{s.url}/v1/completions", timeout=WAIT_S,
            json={"model": "tiny", "prompt": "Hi", "max_tokens": 120, "ignore_eos": True}))
        first.start()
        assert settles(lambda: metrics(s)["dejavu:num_requests_running"] >= 1, WAIT_S)
        r = httpx.post(f"{s.url}/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
        assert r.json()["error"]["type"] == "rate_limit_error"
        first.join(WAIT_S)
