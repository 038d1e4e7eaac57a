"""Scheduling policy of our batching engine: which requests run, and how their prompts enter.

Like vLLM's Scheduler, it decides and the model runner executes. Each iteration the engine asks
it to drop what was cancelled while waiting, to admit the waiting requests that fit the batch
size and the KV-cache budget, and to split the admitted ones into prompts that join the running
decode step (packed, within a token budget) and groups that prefill apart, left-padded.
"""
from __future__ import annotations

import threading
from collections import deque

from tasks.engine.interface import CANCELLED_STEP, Request

PREFILL_PADDING = 1.25  # a prefill's padded tokens over its real ones, at most
PACKED_PROMPT_TOKENS = 256  # the most prompt tokens that join one decode step (packed.py)


class Scheduler:
    """The waiting queue and the admission policy; safe to add to from any thread."""

    def __init__(self, max_batch_size: int, kv_cache_tokens: int, paged: bool = False):
        self.max_batch_size, self.kv_cache_tokens = max_batch_size, kv_cache_tokens
        self.paged = paged  # a request takes its own tokens' slots (kv_pool.py), not a window
        self.waiting: deque[Request] = deque()
        self.wakeup = threading.Condition()
        self.closed = False

    def add(self, request: Request) -> None:
        """Queue a request; raises if it can never fit or the engine is closed."""
        if request.reserved_tokens > self.kv_cache_tokens:
            raise ValueError(f"prompt plus max_new_tokens ({request.reserved_tokens}) exceeds the "
                             f"KV-cache budget of {self.kv_cache_tokens} tokens")
        with self.wakeup:
            if self.closed:
                raise RuntimeError("the engine was closed")
            self.waiting.append(request)
            self.wakeup.notify()

    def close(self) -> None:
        with self.wakeup:
            self.closed = True
            self.wakeup.notify()

    def wait_for_work(self, running: int) -> None:
        """Block while nothing runs, nothing waits and the engine is open."""
        with self.wakeup:
            while not running and not self.waiting and not self.closed:
                self.wakeup.wait()

    def admit(self, running: list[Request]) -> list[Request]:
        """End the waiting requests cancelled meanwhile; take those that fit beside `running`."""
        with self.wakeup:
            for request in [r for r in self.waiting if r.stopped]:
                self.waiting.remove(request)
                request.deliver(CANCELLED_STEP)
            admitted: list[Request] = []
            while self.waiting and not self.closed and \
                    self._fits(running + admitted + [self.waiting[0]]):
                admitted.append(self.waiting.popleft())
            return admitted

    def _fits(self, requests: list[Request]) -> bool:
        """Whether these rows fit the budget: in a pool of slots, their reservations together;
        in a padded window, rows x the longest reservation."""
        reserved = [r.reserved_tokens for r in requests]
        charged = sum(reserved) if self.paged else len(reserved) * max(reserved)
        return len(requests) <= self.max_batch_size and charged <= self.kv_cache_tokens

    def fail_waiting(self, error: BaseException) -> None:
        with self.wakeup:
            for request in self.waiting:
                request.deliver(error)
            self.waiting.clear()


def split_admitted(admitted: list[Request], can_join: bool) -> tuple[list[Request], list[Request]]:
    """(the requests whose prompts join the next decode step, those that prefill apart). With no
    step to join (no running rows, or a model that cannot pack), every prompt prefills."""
    if not can_join:
        return [], admitted
    joining, apart, tokens = [], [], 0
    for request in admitted:  # a long prompt would slow the step for every row: it goes apart
        tokens += len(request.prompt_ids)
        (joining if tokens <= PACKED_PROMPT_TOKENS else apart).append(request)
    return joining, apart


def prefill_groups(requests: list[Request]) -> list[list[Request]]:
    """Group requests, longest prompts first, into prefills whose left padding stays within
    PREFILL_PADDING: each prefill is one forward pass, so on a busy worker the requests that
    arrived during a step prefill together instead of one group per prompt length."""
    groups: list[list[Request]] = []
    for request in sorted(requests, key=lambda r: len(r.prompt_ids), reverse=True):
        if groups and _padding_allows(groups[-1] + [request]):
            groups[-1].append(request)
        else:
            groups.append([request])
    return groups


def _padding_allows(group: list[Request]) -> bool:
    lengths = [len(request.prompt_ids) for request in group]
    return len(lengths) * max(lengths) <= PREFILL_PADDING * sum(lengths)
