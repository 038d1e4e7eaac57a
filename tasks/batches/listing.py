"""Lists of files and batches, newest first, a page at a time, whatever else Redis holds.

Each kind keeps two sorted sets, one of every id and one per owner, all members at score 0:
they sort by id, and ids sort by creation time (contract.new_id), so a page is one
ZREVRANGEBYLEX from the cursor (`after`, OpenAI's pagination) and costs O(log n + page).
"""
from __future__ import annotations

import redis

from tasks.jobs.log import as_text


class Listing:
    """The id lists of one kind of resource (`prefix`: its key prefix)."""

    def __init__(self, client: redis.Redis, prefix: str):
        self.redis, self.prefix = client, prefix

    def _keys(self, owner: str) -> tuple[str, str]:
        return f"{self.prefix}:by-id", f"{self.prefix}:by-owner:{owner}"

    def add(self, pipe: redis.client.Pipeline, owner: str, item_id: str) -> None:
        for key in self._keys(owner):
            pipe.zadd(key, {item_id: 0})

    def remove(self, pipe: redis.client.Pipeline, owner: str, item_id: str) -> None:
        for key in self._keys(owner):
            pipe.zrem(key, item_id)

    def page(self, owner: str | None, after: str | None, limit: int,
             newest_first: bool = True) -> tuple[list[str], bool]:
        """Up to `limit` ids after the cursor id `after`, of `owner` (None: everyone's), and
        whether more follow."""
        all_ids, owners = self._keys(owner or "")
        key = all_ids if owner is None else owners
        if newest_first:
            ids = self.redis.zrevrangebylex(key, f"({after}" if after else "+", "-",
                                            start=0, num=limit + 1)
        else:
            ids = self.redis.zrangebylex(key, f"({after}" if after else "-", "+",
                                         start=0, num=limit + 1)
        return [as_text(i) for i in ids[:limit]], len(ids) > limit
