"""``python -m dejavu_py.serve``: the OpenAI-compatible HTTP server, started by the coordinator's rank.

It connects to the coordinator (the link's key comes in the environment, never on the command line),
waits for ServerInfo, loads the checkpoint's tokenizer, then serves HTTP until it is stopped or the
coordinator is gone for good (exit code 1).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dejavu_py import log
from dejavu_py.errors import UserError
from dejavu_py.serve.settings import FrontEndConfig

_log = log.get("dejavu_py.serve")
_D = FrontEndConfig()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dejavu_py.serve",
                                description="OpenAI-compatible HTTP server over a running dejavu_py coordinator")
    p.add_argument("--link", required=True, metavar="HOST:PORT",
                   help="the coordinator's front-end link (its key is read from the environment)")
    p.add_argument("--checkpoint", required=True, type=Path, metavar="CKPT_DIR",
                   help="the checkpoint directory the coordinator serves (its tokenizer.json is read)")
    p.add_argument("--host", default=_D.host, help=f"interface to listen on (default {_D.host})")
    p.add_argument("--port", type=int, default=_D.port, help=f"HTTP port (default {_D.port})")
    p.add_argument("--served-model-name", default=_D.served_model_name, metavar="NAME",
                   help="the model name clients give (default: the name the coordinator announces)")
    p.add_argument("--max-waiting", type=int, default=_D.max_waiting, metavar="N",
                   help=f"requests in flight beyond which new ones get 429 (default {_D.max_waiting})")
    p.add_argument("--chat-template", type=Path, default=_D.chat_template, metavar="FILE",
                   help="a Jinja chat template replacing the checkpoint's (default: the checkpoint's)")
    p.add_argument("--connect-timeout", type=float, default=_D.connect_timeout_s, metavar="S",
                   help=f"seconds to wait for the coordinator at start (default {_D.connect_timeout_s:g})")
    p.add_argument("--reconnect", type=float, default=_D.reconnect_s, metavar="S",
                   help=f"seconds to try to reconnect after the link drops, then exit (default {_D.reconnect_s:g})")
    p.add_argument("--log-level", default=_D.log_level, choices=("debug", "info", "warning", "error", "critical"),
                   help=f"log level of this process and of the HTTP server (default {_D.log_level})")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> FrontEndConfig:
    return FrontEndConfig(host=args.host, port=args.port, served_model_name=args.served_model_name,
                          max_waiting=args.max_waiting, chat_template=args.chat_template,
                          connect_timeout_s=args.connect_timeout, reconnect_s=args.reconnect, log_level=args.log_level)


def serve(args: argparse.Namespace) -> int:
    from multiprocessing import AuthenticationError

    import prometheus_client
    import uvicorn

    from dejavu_py.comm.local_link import address_from_env
    from dejavu_py.serve.app import build_app
    from dejavu_py.serve.context import ServeContext
    from dejavu_py.serve.engine_client import EngineClient
    from dejavu_py.serve.params import sampling_defaults
    from dejavu_py.tokenizer import load_tokenizer

    cfg = config_from(args)
    log.setup(cfg.log_level.upper(), console_level=cfg.log_level.upper())
    log.set_identity(role="serve")
    if not args.checkpoint.is_dir():
        raise UserError(f"--checkpoint {args.checkpoint}: no such directory")
    tokenizer = load_tokenizer(args.checkpoint)
    if tokenizer is None:
        raise UserError(f"--checkpoint {args.checkpoint}: no tokenizer.json; the HTTP server needs it to turn text "
                        "into tokens and back")
    try:
        address = address_from_env(args.link)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--link {args.link}: {e}") from None
    engine = EngineClient(address, cfg.reconnect_s)
    try:
        info = engine.open(cfg.connect_timeout_s)
    except (OSError, EOFError, AuthenticationError) as e:  # refused, timed out, closed, or a wrong key
        raise UserError(f"--link {args.link}: cannot reach the coordinator ({e})") from None
    ctx = ServeContext(engine, tokenizer, info, cfg, args.checkpoint,
                       sampling_defaults(args.checkpoint, cfg.default_temperature))
    prometheus_client.disable_created_metrics()  # one series per metric, as vLLM exports them
    server = uvicorn.Server(uvicorn.Config(build_app(ctx), host=cfg.host, port=cfg.port, loop="auto",
                                           log_level=cfg.log_level, timeout_graceful_shutdown=cfg.graceful_shutdown_s))
    engine.on_gone = lambda: setattr(server, "should_exit", True)
    _log.info("serving %s on http://%s:%d (coordinator at %s)", ctx.model_name, cfg.host, cfg.port, address)
    try:
        server.run()  # loop="auto": uvloop when installed (the "serve" extra installs it)
    finally:
        engine.close()
    return 1 if engine.gone else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return serve(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
