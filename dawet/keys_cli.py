"""`dawet keys create|revoke|list`: API keys managed at run time, in the service's Redis.

A created key is printed once; only its digest is stored. API processes pick up a new or
revoked key within a few seconds (api/keys.py), without a restart.
"""
from __future__ import annotations

import argparse
import sys

from dawet.redis_client import redis_client
from dawet.settings import KEY_NAME, get_settings


def add_key_commands(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it once")
    create.add_argument("name", help="a unique name: letters, digits, _ . @ -")
    create.add_argument("--models", help="comma-separated models the key may use (default: all)")
    create.add_argument("--admin", action="store_true",
                        help="the key sees every key's jobs, conversations and usage")
    create.add_argument("--daily-tokens", type=int, default=None,
                        help="tokens the key may use per UTC day (0: no budget; default: "
                             "DAWET_DAILY_TOKEN_BUDGET)")
    revoke = actions.add_parser("revoke", help="revoke a key by name")
    revoke.add_argument("name")
    actions.add_parser("list", help="list the keys created here (not DAWET_API_KEYS)")


def run_keys(args: argparse.Namespace) -> int:
    from api.keys import KeyStore  # the API's module: the one home of key records

    store = KeyStore(redis_client(get_settings()))
    return {"create": _create, "revoke": _revoke, "list": _list}[args.action](store, args)


def _create(store, args: argparse.Namespace) -> int:
    from api.keys import Principal

    if not KEY_NAME.fullmatch(args.name):
        return _fail(f"invalid key name {args.name!r}: use 1 to 64 letters, digits, _ . @ -")
    if args.daily_tokens is not None and args.daily_tokens < 0:
        return _fail("--daily-tokens must be 0 or more")
    models = frozenset(filter(None, (args.models or "").split(","))) or None
    key = store.create(Principal(args.name, models, args.admin, args.daily_tokens))
    if key is None:
        return _fail(f"a key named {args.name!r} exists already; revoke it first")
    sys.stdout.write(key + "\n")
    sys.stderr.write(f"created key {args.name!r}; it is shown only now\n")
    return 0


def _revoke(store, args: argparse.Namespace) -> int:
    if not store.revoke(args.name):
        return _fail(f"no key named {args.name!r}")
    sys.stderr.write(f"revoked key {args.name!r}\n")
    return 0


def _list(store, args: argparse.Namespace) -> int:
    for principal in store.all():
        models = ",".join(sorted(principal.models)) if principal.models else "*"
        budget = "default" if principal.daily_tokens is None else principal.daily_tokens
        admin = " admin" if principal.admin else ""
        sys.stdout.write(f"{principal.name}\tmodels={models}\tdaily_tokens={budget}{admin}\n")
    return 0


def _fail(message: str) -> int:
    sys.stderr.write(f"dawet keys: {message}\n")
    return 2
