"""Token sequences the engine has seen, whose keys and values stay in the KV pool's slots
(kv_pool.py), so that a prompt that starts the same way skips that part of its prefill: a
conversation's next turn (its history was the last turn's prompt and reply), a system prompt
many users share, a regenerated reply.

Sequences are kept whole: a prompt once it is prefilled, a row once it leaves the batch (its
prompt and reply). Keeping one copies nothing: the cache holds a reference on its slots, and a
prompt that hits shares them, as vLLM's blocks are shared. Each prefix of a kept sequence that
ends at a full block of BLOCK tokens is indexed by a hash chained over its blocks, as vLLM's
block hashes are, so a lookup walks the prompt's blocks to the longest such prefix some kept
sequence shares, then goes on token by token while that sequence and the prompt agree (as
SGLang's radix tree matches): a conversation's next turn shares its history and reply to the
token, not only to the last full block before them (bench/prefix.py's turns, in the engine: a
median of 20 tokens left to compute, against 28 to the block). The tokens are compared, so a
hash collision can never hand out another prefix's cache. Kept sequences are evicted least
recently used first when the slots the cache holds would exceed its budget, and when the pool
needs free slots for running requests (memory pressure). A sequence's KV depends on the LoRA
adapter it ran with, so each adapter's sequences hash in a namespace of their own (vLLM adds
the LoRA id to its block hashes alike).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tasks.engine.batching.kv_pool import KVPool
from tasks.engine.interface import PrefixCacheStats

BLOCK = 16  # tokens per block: the unit of a match


@dataclass
class _Kept:
    tokens: list[int]
    slots: list[int]  # the KV pool's slots of its tokens, in order
    namespace: int


@dataclass
class Hit:
    """The first `tokens` tokens of a prompt, and the pool slots that hold their KV."""

    tokens: int
    slots: list[int]


class PrefixCache:
    """Kept sequences' slots, indexed by block-aligned prefix, least recently used out first."""

    def __init__(self, capacity_tokens: int, pool: KVPool):
        self.capacity_tokens, self.pool = capacity_tokens, pool
        self.queried_tokens = 0  # prompt tokens looked up, and those a hit covered
        self.hit_tokens = 0
        self._kept: OrderedDict[int, _Kept] = OrderedDict()  # by id, oldest use first
        self._index: dict[int, tuple[int, int]] = {}  # prefix hash: (kept id, its blocks)
        self._next_id = 0
        pool.reclaim = self._make_free

    @property
    def tokens(self) -> int:
        """Tokens (slots) the cache holds."""
        return self.pool.cached

    def lookup(self, prompt: list[int], namespace: int = 0) -> Hit | None:
        """The longest prefix of `prompt` kept in `namespace` that leaves at least its last token
        to compute (a prefill must yield logits), or None. A hit's slots stay valid until the
        cache changes: share them (KVPool.share) before that."""
        self.queried_tokens += len(prompt)
        best: tuple[int, int] | None = None
        for blocks, digest in enumerate(_chain(prompt[:len(prompt) - 1], namespace), start=1):
            found = self._index.get(digest)
            if found is None:
                break
            best = found[0], blocks
        if best is None:
            return None
        kept_id, blocks = best
        kept, length = self._kept[kept_id], blocks * BLOCK
        if kept.tokens[:length] != prompt[:length] or kept.namespace != namespace:  # a collision
            return None
        length = _agreeing(kept.tokens, prompt, length, min(len(kept.tokens), len(prompt) - 1))
        self._kept.move_to_end(kept_id)
        self.hit_tokens += length
        return Hit(length, kept.slots[:length])

    def keep(self, tokens: list[int], slots: list[int], namespace: int = 0) -> None:
        """Keep a sequence in `namespace`: its tokens and the slots of (at least) their KV; one
        shorter than a block is not worth it. The cache takes a reference on the slots; nothing
        is copied."""
        length = min(len(tokens), len(slots))
        if length < BLOCK or length > self.capacity_tokens:
            return
        digests = list(_chain(tokens[:length], namespace))
        holder = self._index.get(digests[-1])
        if holder is not None and self._kept[holder[0]].tokens[:length] == tokens[:length]:
            self._kept.move_to_end(holder[0])  # a kept sequence holds this whole one already
            return
        kept_id, self._next_id = self._next_id, self._next_id + 1
        self._kept[kept_id] = _Kept(tokens[:length], slots[:length], namespace)
        self.pool.cache(slots[:length])
        for blocks, digest in enumerate(digests, start=1):
            self._index[digest] = (kept_id, blocks)
        while self.pool.cached > self.capacity_tokens:
            self._evict_oldest()

    def clear(self) -> None:
        while self._kept:
            self._evict_oldest()

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self.tokens, self.queried_tokens, self.hit_tokens)

    def _make_free(self, count: int) -> None:
        """Evict the least recently used sequences until the pool has `count` free slots, or
        nothing is kept (the pool's slots under pressure)."""
        while self._kept and self.pool.free < count:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        kept_id, kept = self._kept.popitem(last=False)
        self.pool.uncache(kept.slots)
        for digest in _chain(kept.tokens, kept.namespace):
            if self._index.get(digest, (None,))[0] == kept_id:
                del self._index[digest]


def _agreeing(kept: list[int], prompt: list[int], start: int, end: int) -> int:
    """How far from `start` (where they agree) up to `end` `kept` and `prompt` go on agreeing."""
    while start < end and kept[start] == prompt[start]:
        start += 1
    return start


def _chain(tokens: list[int], namespace: int):
    """The hash of each full block's prefix: block i's chained over blocks 0..i, from the
    namespace's seed."""
    digest = hash(("namespace", namespace))
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        digest = hash((digest, tuple(tokens[start:start + BLOCK])))
        yield digest
