"""Command-line flags generated from the config dataclasses (config.py), so that a default is written once.

One flag per field: its type, choices (a ``Literal`` type) and default come from the field, its help text
from the field's docstring (the string literal after it, read from the source). A flag is the field's
name with hyphens, less a trailing ``_s`` (seconds: ``comm_timeout_s`` is ``--comm-timeout``);
``RENAMED`` lists the others. A bool field is ``--x`` / ``--no-x``, except those in ``ON_OFF``.

Parsed values default to None, meaning "not given": the dataclass's default applies then, and a YAML
file (cli.py) can set any flag's value first.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from dejavu_py.config import RunConfig

SECTIONS: dict[str, str] = {
    "": "input and output",
    "pipeline": "pipeline",
    "scheduler": "batching and KV cache",
    "cache": "batching and KV cache",
    "generation": "generation defaults",
    "runtime": "runtime",
    "kernels": "kernels",
    "ft": "fault tolerance",
    "serve": "serving (online, OpenAI-compatible HTTP)",
}
"""RunConfig's field of each config section ('' = RunConfig's own fields) -> the help group it is listed in."""

RENAMED: dict[tuple[str, str], str] = {("cache", "capacity_tokens"): "kv-capacity-tokens", ("ft", "enabled"): "ft",
                                      ("serve", "enabled"): "serve"}
ON_OFF: frozenset[tuple[str, str]] = frozenset({("ft", "enabled")})
"""Bool fields whose flag takes a value, on or off (``--ft off``), as the flag always has."""


@dataclasses.dataclass(frozen=True)
class Flag:
    """One field of the run configuration as a command-line flag."""

    section: str
    """RunConfig's field holding the field's dataclass; '' for RunConfig's own fields."""
    field: str
    name: str
    """The flag without its dashes, e.g. 'kv-capacity-tokens'."""
    type: Any
    """The field's type, None stripped from an optional one."""
    default: Any
    """The dataclass's default (dataclasses.MISSING for a required field or one made by a factory)."""
    doc: str

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


@functools.cache
def _docs(cls: type) -> dict[str, str]:
    """Each field's docstring: the string literal right after its annotated assignment in the class body."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, after in itertools.pairwise(body):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def _optional_stripped(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _flag_name(section: str, name: str) -> str:
    return RENAMED.get((section, name)) or name.removesuffix("_s").replace("_", "-")


def _fields_of(cls: type, section: str) -> list[Flag]:
    hints, docs = get_type_hints(cls), _docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        if f.name not in docs:
            raise TypeError(f"{cls.__name__}.{f.name} has no docstring: it is the flag's help text")
        out.append(Flag(section, f.name, _flag_name(section, f.name), _optional_stripped(hints[f.name]), f.default,
                        docs[f.name]))
    return out


@functools.lru_cache(maxsize=1)
def all_flags() -> tuple[Flag, ...]:
    """RunConfig's own fields, then each section's, in the order of the dataclasses."""
    hints = get_type_hints(RunConfig)
    flags = _fields_of(RunConfig, "")
    for f in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            flags += _fields_of(hints[f.name], f.name)
    return tuple(flags)


# ---------------------------------------------------------------- value types


def int_list(text: str) -> list[int]:
    """``3,5,4`` -> [3, 5, 4]."""
    from dejavu_py.protocol.split import parse_layers_per_stage

    return parse_layers_per_stage(text)


def step_window(text: str) -> tuple[int, int]:
    """``100:120`` -> (100, 120)."""
    try:
        first, last = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIRST:LAST step numbers, e.g. 100:120") from None
    return first, last


def on_off(text: str) -> bool:
    """``on`` -> True, ``off`` -> False."""
    if text in ("on", "off"):
        return text == "on"
    raise argparse.ArgumentTypeError(f"{text!r}: choose on or off")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _argument(flag: Flag) -> tuple[list[str], dict[str, Any]]:
    """The option strings and keyword arguments of ``add_argument`` for a flag."""
    shown = "" if flag.default in (None, dataclasses.MISSING) else f" (default: {_shown(flag.default)})"
    kw: dict[str, Any] = {"dest": flag.dest, "default": None, "help": (flag.doc + shown).replace("%", "%%")}
    t = flag.type
    if (flag.section, flag.field) in ON_OFF:
        kw.update(type=on_off, metavar="{on,off}")
    elif t is bool:
        kw.update(action=argparse.BooleanOptionalAction)
    elif get_origin(t) is Literal:
        kw.update(choices=list(get_args(t)), type=type(get_args(t)[0]))
    elif get_origin(t) is list:
        kw.update(type=int_list, metavar="N,N,...")
    elif get_origin(t) is tuple:
        kw.update(type=step_window, metavar="FIRST:LAST")
    elif t in (int, float, str, Path):
        kw.update(type=t, metavar=flag.name.split("-")[-1].upper() if t is Path else None)
    else:
        raise TypeError(f"{flag.section}.{flag.field}: no flag for type {t!r}")
    return [f"--{flag.name}"], kw


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Every field of the run configuration as a flag, in its help group."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag in all_flags():
        title = SECTIONS[flag.section]
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        names, kw = _argument(flag)
        groups[title].add_argument(*names, **kw)


def to_config(ns: argparse.Namespace) -> RunConfig:
    """The RunConfig of parsed flags: the given ones (not None), the dataclasses' defaults for the rest."""
    given: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for flag in all_flags():
        value = getattr(ns, flag.dest)
        if value is not None:
            given[flag.section][flag.field] = value
    hints = get_type_hints(RunConfig)
    sections = {name: hints[name](**values) for name, values in given.items() if name}
    return RunConfig(**given[""], **sections)


__all__ = ["Flag", "add_flags", "all_flags", "int_list", "on_off", "step_window", "to_config"]
