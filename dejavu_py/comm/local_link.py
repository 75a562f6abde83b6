"""A link between two processes of one host: pickled messages over a loopback TCP connection that
authenticates both ends with a shared key (``multiprocessing.connection``). The coordinator listens;
an online front-end (the HTTP server's process, the Python API) connects, and may connect again.

The key travels to the connecting process in an environment variable (``KEY_ENV``), never on its
command line, where any user of the host could read it.
"""
from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

from dejavu_py import log

_log = log.get(__name__)

KEY_ENV = "DEJAVU_LINK_KEY"
"""Environment variable that hands the link's key (hex) to the process that connects."""


@dataclass(frozen=True)
class LinkAddress:
    host: str
    port: int
    key_hex: str

    def __str__(self) -> str:  # the key stays out of logs and command lines
        return f"{self.host}:{self.port}"

    @staticmethod
    def parse(text: str, key_hex: str) -> LinkAddress:
        host, _, port = text.rpartition(":")
        return LinkAddress(host or "127.0.0.1", int(port), key_hex)


class Link:
    """One connection: ``send`` from any thread; ``start_reading`` hands every message to ``deliver`` on
    a thread of its own and calls ``on_closed`` once when the other end goes away."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.closed = False
        self._lock = threading.Lock()

    def send(self, msg: Any) -> bool:
        """False when the other end is gone (the message is dropped)."""
        if self.closed:
            return False
        try:
            with self._lock:
                self.conn.send(msg)
            return True
        except (OSError, EOFError, ValueError):
            self.close()
            return False

    def start_reading(self, deliver: Callable[[Any], None], on_closed: Callable[[], None], name: str) -> threading.Thread:
        def run() -> None:
            try:
                while True:
                    deliver(self.conn.recv())
            except (OSError, EOFError, ValueError):
                pass
            finally:
                self.close()
                on_closed()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Shut the socket down before closing it: a reader thread blocked on it returns, and the other
        end sees the link end at once."""
        if not self.closed:
            self.closed = True
            try:
                with socket.fromfd(self.conn.fileno(), socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                self.conn.close()
            except OSError:
                pass


class LinkServer:
    """Listens on a free loopback port; every connection that authenticates is handed to ``on_link``."""

    def __init__(self, on_link: Callable[[Link], None], host: str = "127.0.0.1") -> None:
        key = secrets.token_bytes(16)
        self._listener = Listener((host, 0), authkey=key)
        self.address = LinkAddress(host, self._listener.address[1], key.hex())
        self._on_link = on_link
        self._closed = False
        threading.Thread(target=self._accept, name="link-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()
            except Exception as e:  # a client that failed authentication, or the listener closed
                if not self._closed:
                    _log.warning("a connection to the front-end link was refused: %s", e)
                continue
            self._on_link(Link(conn))

    def child_env(self) -> dict[str, str]:
        """Environment entries a connecting child process needs (its key)."""
        return {KEY_ENV: self.address.key_hex}

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.close()
        except OSError:
            pass


def connect(address: LinkAddress, timeout_s: float) -> Link:
    """Connect (retrying while the listener is not up yet, at most ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return Link(Client((address.host, address.port), authkey=bytes.fromhex(address.key_hex)))
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no coordinator listening at {address} after {timeout_s:.0f}s") from None
            time.sleep(0.05)


def address_from_env(text: str) -> LinkAddress:
    """The address given on the command line, with the key from the environment."""
    key = os.environ.get(KEY_ENV)
    if not key:
        raise RuntimeError(f"{KEY_ENV} is not set: this process must be started by the coordinator's rank")
    return LinkAddress.parse(text, key)
