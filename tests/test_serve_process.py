"""``python -m dejavu_py.serve`` as the coordinator's rank starts it: it connects with the key from its
environment, serves HTTP, and exits when the coordinator is gone (tests/serve_stack.py's scripted
coordinator stands in for the coordinator)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from serve_stack import REPLY, ScriptedCoordinator

from dejavu_py.comm.local_link import KEY_ENV

ROOT = Path(__file__).resolve().parents[1]


pytest_plugins = ["serve_fixtures"]


def test_the_process_serves_and_exits_when_the_coordinator_is_gone(ckpt, tok):
    coord = ScriptedCoordinator(tok)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, KEY_ENV: coord.server.address.key_hex, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "dejavu_py.serve", "--link", str(coord.server.address), "--host", "127.0.0.1",
           "--port", str(port), "--checkpoint", str(ckpt), "--served-model-name", "named", "--reconnect", "0.5",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.2)
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "named"
        r = httpx.post(f"{url}/v1/completions", json={"model": "named", "prompt": "Hello", "max_tokens": 3}, timeout=30)
        assert r.json()["choices"][0]["text"] == tok.decode(tok.encode(REPLY)[:3])
        coord.refuse = True
        coord.link.close()
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        coord.server.close()


def test_the_process_refuses_to_start_without_the_key(ckpt):
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-m", "dejavu_py.serve", "--link", "127.0.0.1:9", "--checkpoint", str(ckpt)],
                       env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: --link") and KEY_ENV in r.stderr
