"""CPU-heavy request work (tokenizing, chat templates) run off the API's event loop.

gunicorn runs the API with gevent: one OS thread serves every request of a process, so a
megabyte prompt tokenized on it stalls every other stream of that process until it is done
(half a second for 280,000 tokens). On gevent's pool of real threads the loop keeps serving
while the work releases the GIL (the tokenizer's batch call does, ChatTokenizer.encode) or
holds it only in turns (Python code such as a chat template, by the switch interval). Call
it with plain data only: gevent's patched locks and Flask's request context do not work on
those threads.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
# Work on fewer characters than this runs on the loop: tokenizing 2,000 characters takes about
# half a millisecond, while the hand-off to a thread and back took 13 ms on a busy loop (the
# submission path at 16 clients, bench/job_path.py), most of a short job's POST.
INLINE_CHARS = 2000


def off_loop(work: Callable[..., T], *args, chars: int | None = None) -> T:
    """`work(*args)` on a real thread under gevent (waiting without blocking the loop), else
    right here. `chars`: how much text the work reads, if known; little runs right here."""
    if not _under_gevent() or (chars is not None and chars < INLINE_CHARS):
        return work(*args)
    from gevent import get_hub

    return get_hub().threadpool.apply(work, args)


def _under_gevent() -> bool:
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("threading")
