"""Logging with the process's role, stage and rank in every record.

Each process calls :func:`setup` once; every logger of the package then prints e.g.
``12:00:01.234 token t1 r3 INFO dejavu_py.stage.worker: loaded 4 layers in 0.8 s`` (role, stage
name, rank).

A progress bar drawn in place on the console goes through :func:`draw_bar` / :func:`end_bar`, so that
the console handler can end the bar's line before it prints a record: log lines and the bar never
share a line (the bar is drawn again on its next update).
"""
from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import TextIO

_FORMAT = "%(asctime)s.%(msecs)03d %(role)s %(stage)s r%(rank)s %(levelname)s %(name)s: %(message)s"
_DATEFMT = "%H:%M:%S"


class _Identity(logging.Filter):
    """Stamps role, stage and rank on each record (they can change: a standby becomes a stage)."""

    role = "main"
    stage = "-"
    rank = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.role, record.stage, record.rank = self.role, self.stage, self.rank
        return True


_identity = _Identity()

_CLEAR_LINE = "\r\033[K"
"""Back to the start of the line and erase it (ANSI): what a record printed over the bar first writes."""


class _BarLine:
    """The bar's state on the console: which stream holds a drawn, unfinished bar line (None: none).
    Its lock orders the bar's writes with the console handler's."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.stream: TextIO | None = None


_bar = _BarLine()


def draw_bar(text: str, stream: TextIO | None = None) -> None:
    """Draw ``text`` in place of the current line of ``stream`` (stderr by default), no newline."""
    out = sys.stderr if stream is None else stream
    with _bar.lock:
        out.write(_CLEAR_LINE + text)
        out.flush()
        _bar.stream = out


def end_bar() -> None:
    """Finish the bar's line with a newline (the bar stays visible above later output)."""
    with _bar.lock:
        if _bar.stream is not None:
            _bar.stream.write("\n")
            _bar.stream.flush()
            _bar.stream = None


class ConsoleHandler(logging.StreamHandler):
    """A stream handler that erases a bar drawn on its stream before it prints a record."""

    def emit(self, record: logging.LogRecord) -> None:
        with _bar.lock:
            if _bar.stream is not None and _bar.stream is self.stream:
                try:
                    self.stream.write(_CLEAR_LINE)
                except (OSError, ValueError):  # a closed stream: let emit report it the usual way
                    pass
                _bar.stream = None
            super().emit(record)


def set_identity(role: str | None = None, stage: int | str | None = None, rank: int | str | None = None) -> None:
    """Change what later records say about this process."""
    if role is not None:
        _identity.role = role
    if stage is not None:
        _identity.stage = str(stage)
    if rank is not None:
        _identity.rank = str(rank)


def setup(level: str = "INFO", log_file: Path | None = None, console_level: str | None = None) -> None:
    """Configure the package logger: a per-process file at ``level`` and stderr at ``console_level``
    (None = no console)."""
    root = logging.getLogger("dejavu_py")
    root.setLevel(logging.DEBUG)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    fmt = logging.Formatter(_FORMAT, _DATEFMT)
    handlers: list[logging.Handler] = []
    if console_level is not None:
        console = ConsoleHandler(sys.stderr)
        console.setLevel(console_level.upper())
        handlers.append(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file)
        to_file.setLevel(level.upper())
        handlers.append(to_file)
    if not handlers:  # silence, rather than logging's last-resort stderr handler
        handlers.append(logging.NullHandler())
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(_identity)
        root.addHandler(h)


def get(name: str) -> logging.Logger:
    """The package logger for a module (``get(__name__)``)."""
    return logging.getLogger(name)

