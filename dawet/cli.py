"""The `dawet` command: run the whole stack, or one worker or the API on its own."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from dawet.keys_cli import add_key_commands, run_keys
from dawet.processes import Stack, StartupError, api_argv, worker_argv
from dawet.settings import get_settings

logger = logging.getLogger("dawet")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command."""
    parser = argparse.ArgumentParser(prog="dawet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="start Redis (if DAWET_REDIS_URL is unset), a worker and the API")
    worker = commands.add_parser("worker", help="start one Celery worker for one model")
    worker.add_argument("--model", help="registry model (default: DAWET_DEFAULT_MODEL or the first)")
    worker.add_argument("--gpu", help="GPU index to pin (sets CUDA_VISIBLE_DEVICES)")
    worker.add_argument("--name", default="%h", help="Celery node name suffix")
    commands.add_parser("api", help="start the API under gunicorn")
    build = commands.add_parser("build-demo", help="build the offline demo models")
    build.add_argument("--out", default="var/models")
    add_key_commands(commands.add_parser("keys", help="create, revoke and list API keys"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=get_settings().log_level, format="%(asctime)s %(name)s %(message)s")
    return COMMANDS[args.command](args)


def run_stack(args: argparse.Namespace) -> int:
    """Run until Ctrl-C or SIGTERM, then stop every child in order."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stack = Stack(get_settings(), persist_redis=True).start()
    except StartupError as exc:
        logger.error("could not start Dawet: %s", exc)
        return 1
    _print_urls(stack)
    while not stop.wait(1.0):
        if not all(child.alive() for child in stack.children):
            logger.error("a Dawet process exited; stopping the rest")
            break
    stack.stop()
    return 0


def _print_urls(stack: Stack) -> None:
    base = stack.api_url
    sys.stdout.write(
        f"\nDawet is ready.\n  API        {base}/v1/generate\n  Health     {base}/readyz\n"
        f"  Redis      {stack.settings.redis_url}\nPress Ctrl-C to stop.\n\n")
    sys.stdout.flush()


def run_worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    argv = worker_argv(args.model, args.gpu, settings.worker_concurrency,
                       f"{args.model or 'default'}@{args.name}", settings.log_level)
    os.execv(argv[0], argv)


def run_api(args: argparse.Namespace) -> int:
    settings = get_settings()
    if settings.require_api_keys and not settings.has_configured_keys():
        logger.error("refusing to start the API without API keys: DAWET_REQUIRE_API_KEYS is "
                     "set but DAWET_API_KEYS and DAWET_ADMIN_API_KEYS are empty. Set one to "
                     "the SHA-256 digest of a key, e.g. `printf %%s \"$KEY\" | sha256sum`.")
        return 2
    argv = api_argv(settings)
    os.execv(argv[0], argv)


def build_demo(args: argparse.Namespace) -> int:
    from model_store.demo.build import main as build_main

    return build_main(["--out", args.out]) or 0


COMMANDS = {"run": run_stack, "worker": run_worker, "api": run_api, "build-demo": build_demo,
            "keys": run_keys}

if __name__ == "__main__":
    sys.exit(main())
