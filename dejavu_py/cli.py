"""Command line: flags, YAML defaults, and what each process does.

    torchrun --nproc-per-node 3 -m dejavu_py --config configs/tiny-cpu.yaml \\
        --model CKPT_DIR --prompts requests.jsonl --output out.jsonl --run-dir runs/x

``python -m dejavu_py --nproc-per-node 3 ...`` does the same without torchrun on the command line: it
checks the inputs first (a user mistake is one line, never a traceback) and then starts the ranks
with torch's elastic launcher. Every YAML key is a flag name (``max_batch_size: 8``); flags win.

``serve`` as the first argument serves clients online instead of a request file: rank 0 starts an
OpenAI-compatible HTTP server (see ``python -m dejavu_py serve --help``), under any launcher:

    python -m dejavu_py serve --nproc-per-node 3 --config configs/tiny-cpu.yaml --model CKPT_DIR --port 8000
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml

from dejavu_py import flags
from dejavu_py.config import RunConfig
from dejavu_py.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        raise UserError(f"{message} (see --help)")


SERVE = "serve"
"""The subcommand (the first argument) that serves online; without it the command runs a request file."""

_SERVE_HELP = """\
Serve a Mixture-of-Experts checkpoint online with a pipeline of stages, one process per stage: rank 0
starts an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /health,
/metrics, /version) whose streams go on through a stage worker's death. No --prompts: requests come
over HTTP until SIGTERM or SIGINT to rank 0 (or the launcher) stops serving."""


def split_subcommand(argv: list[str]) -> tuple[bool, list[str]]:
    """(serving, the flags): ``serve`` is only a subcommand as the first argument."""
    if argv and argv[0] == SERVE:
        return True, argv[1:]
    return False, argv


def build_parser(serving: bool = False) -> _Parser:
    """Every flag of the run configuration (flags.py: from the config dataclasses), plus --config and
    --nproc-per-node, which choose how to run rather than what. ``serving``: the serve subcommand's."""
    p = _Parser(
        prog=f"python -m dejavu_py {SERVE}" if serving else "python -m dejavu_py",
        description=_SERVE_HELP if serving else (
            "Serve a Mixture-of-Experts checkpoint with a pipeline of stages, one process per stage.\n"
            f"Subcommand: '{SERVE}' (the first argument) serves online over HTTP instead of a request file;\n"
            f"its flags: '%(prog)s {SERVE} --help'."),
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML file of defaults for any flag below (keys are flag names)")
    flags.add_flags(p)
    la = p.add_argument_group("launching without torchrun")
    la.add_argument("--nproc-per-node", type=int, help="start this many rank processes here (what torchrun --nproc-per-node does)")
    return p


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except yaml.MarkedYAMLError as e:
        raise UserError(_syntax_error(path, e)) from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: cannot read YAML: {str(e).splitlines()[0]}") from None


def _syntax_error(path: Path, e: yaml.MarkedYAMLError) -> str:
    """``x.yaml line 3: <problem>``, and where the construct it breaks began if that is another line."""
    mark = e.problem_mark or e.context_mark
    where = f" line {mark.line + 1}" if mark is not None else ""
    began = ""
    if e.context and e.context_mark is not None and e.problem_mark is not None and e.context_mark.line != mark.line:
        began = f" ({e.context} that began on line {e.context_mark.line + 1})"
    return f"{path}{where}: {e.problem or e.context}{began}"


def _yaml_defaults(parser: _Parser, path: Path) -> dict[str, Any]:
    """Flag defaults from a YAML mapping; each value goes through the flag's own type check."""
    data = _read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    out: dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise UserError(_unknown_key(path, str(key), [a.option_strings[0][2:] for a in actions.values()]))
        out[dest] = _convert(path, key, value, actions[dest])
    return out


def _unknown_key(path: Path, key: str, names: list[str]) -> str:
    """The error of a key that is no flag: the closest flag name, or all of them."""
    close = difflib.get_close_matches(key.replace("_", "-"), names, n=1)
    if close:
        return f"{path}: unknown key {key!r}; did you mean {close[0]!r}?"
    return f"{path}: unknown key {key!r}; known keys: {', '.join(sorted(names))}"


def _convert(path: Path, key: str, value: Any, action: argparse.Action) -> Any:
    if value is None:
        return None
    if isinstance(action, argparse.BooleanOptionalAction) or action.type is flags.on_off:
        if isinstance(value, bool):  # YAML's true/false (and on/off, yes/no)
            return value
        if action.type is None:
            raise UserError(f"{path}: key {key!r}: expected true or false, got {value!r}")
    try:
        if isinstance(value, list) and action.type is flags.int_list:
            value = ",".join(str(v) for v in value)
        elif isinstance(value, list) and action.type is flags.step_window:
            value = ":".join(str(v) for v in value)
        v = action.type(str(value)) if action.type is not None else value
    except (ValueError, TypeError, argparse.ArgumentTypeError, UserError):
        raise UserError(f"{path}: key {key!r}: invalid value {value!r}") from None
    if action.choices is not None and v not in action.choices:
        raise UserError(f"{path}: key {key!r}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return v


def parse(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    """Flags (over YAML defaults) -> RunConfig; raises UserError naming the flag or key. A leading
    ``serve`` sets ServeConfig.enabled, as ``--serve`` does."""
    serving, argv = split_subcommand(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser(serving)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    first, _ = pre.parse_known_args(argv)
    if first.config is not None:
        parser.set_defaults(**_yaml_defaults(parser, first.config))
    ns = parser.parse_args(argv)
    if serving:
        ns.serve = True
    _check_required(ns)
    return flags.to_config(ns), ns


def _check_required(ns: argparse.Namespace) -> None:
    """--model always; --prompts for a batch run only: a server gets its requests over HTTP, so a request
    file given to it is refused rather than silently left unread."""
    if ns.model is None:
        raise UserError("--model is required (or set 'model:' in the --config file)")
    if ns.serve and ns.prompts is not None:
        raise UserError(f"--prompts {ns.prompts}: a server takes its requests over HTTP, not from a file; "
                        f"leave --prompts out, or run the file without '{SERVE}' / --serve")
    if not ns.serve and ns.prompts is None:
        raise UserError("--prompts is required (or set 'prompts:' in the --config file), "
                        f"or serve online: python -m dejavu_py {SERVE} ...")


def main(argv: list[str] | None = None) -> int:
    from dejavu_py.comm.store import RankInfo
    from dejavu_py.runtime import user_errors

    info = RankInfo.from_env()
    try:
        cfg, ns = parse(argv)
        if info.launcher == "single" and ns.nproc_per_node and ns.nproc_per_node > 1:
            from dejavu_py.runtime.launch import launch_local

            return launch_local(cfg, ns.nproc_per_node, sys.argv[1:] if argv is None else argv)
        if ns.nproc_per_node and info.launcher != "single" and ns.nproc_per_node != info.world_size:
            raise UserError(f"--nproc-per-node {ns.nproc_per_node}: the launcher started {info.world_size} processes")
        from dejavu_py.runtime.rank import run_rank

        code = run_rank(cfg, info, lambda e: user_errors.report(str(e), info.rank))
        # A rank process ends here, without running C++ static destructors: threads of the
        # communication libraries may still be parked in their calls, and tearing those objects
        # down under them aborts the process ("terminate called without an active exception").
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    except UserError as e:
        user_errors.report(str(e), info.rank)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
