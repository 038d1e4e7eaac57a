"""The KV cache of our Llama forward: one pool of token slots, allocated once at its budget.

The padded window (kv_cache.py) held rows x the longest row's tokens, in buffers that grew by
doubling, so its memory followed the batch's longest row rather than DAWET_KV_CACHE_TOKENS.
Here each layer's keys and values live in one tensor of `capacity` token slots (vLLM's blocks
with a block size of one; SGLang's token pool). A sequence holds the slots of its computed
tokens, in no particular order; a row's slots are a row of the slot table. The prefix cache
(prefix_cache.py) holds the slots of the sequences it keeps, and a prompt that starts like one
of them shares those. The scheduler admits a request only while the tokens all admitted ones
reserve (prompt plus max_new_tokens) fit the capacity, so a growing sequence always finds a
slot, free or evicted from the prefix cache; a finished one lets go of its slots at once:
nothing moves or widens.

Attention reads a layer's slots through a gather into a padded (rows, heads, columns, dim)
tensor. That gather is the one copy beside the pool: one layer's at a time, of the running
rows' tokens (each row padded to the longest), into scratch buffers every layer reuses. Padding
points at slot 0, which holds zeros, so masked columns stay finite.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from tasks.engine.batching.kv_cache import compaction

PAD = 0  # the slot padding points at: zeros, never allocated
MIN_ROWS, MIN_COLUMNS = 8, 64  # the slot table's first size; it doubles from there


class KVPool:
    """Every layer's keys and values, (capacity + 1, kv heads, head dim), and who holds each
    slot: the sequences that use it (a prompt that hit the prefix cache shares its slots) and
    the prefix cache (prefix_cache.py). A slot neither holds is free.

    Slots first: a gather copies a slot's heads as one run (3x faster than heads first, for 16
    rows of SmolLM2-135M's shape)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        self.capacity, self.device = capacity, device
        shape = (capacity + 1, kv_heads, head_dim)
        # empty: a slot is read only once written, so pages are touched as the cache fills
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        for tensor in (*self.keys, *self.values):
            tensor[PAD].zero_()
        # where gathers land, (tokens, kv heads, dim) for keys and values: one layer's at a
        # time, kept at the largest size a step needed
        self._scratch = [torch.empty((0, kv_heads, head_dim), dtype=dtype, device=device)
                         for _ in range(2)]
        # called with a count of slots when fewer are free: the prefix cache evicts for them
        self.reclaim: Callable[[int], None] = lambda count: None
        self.release_all()

    @property
    def free(self) -> int:
        return len(self._free)

    def release_all(self) -> None:
        """Every slot free, whoever held it (the prefix cache must forget its own first)."""
        self._free = list(range(self.capacity, PAD, -1))  # popped from the end: low slots first
        # per slot, counted in arrays (a 1,500-token prompt's slots in one operation):
        self._users = np.zeros(self.capacity + 1, dtype=np.int32)  # sequences that hold it
        self._kept = np.zeros(self.capacity + 1, dtype=np.int32)  # kept sequences with it
        self.used = 0  # slots some sequence holds
        self.cached = 0  # slots the prefix cache holds

    def allocate(self, count: int) -> list[int]:
        """Free slots for a sequence's new tokens; under pressure the prefix cache evicts."""
        if count > len(self._free):
            self.reclaim(count)
        if count > len(self._free):  # the scheduler's reservations make this a bug
            raise RuntimeError(f"the KV pool has {len(self._free)} free slots, {count} asked")
        taken = self._free[len(self._free) - count:]
        del self._free[len(self._free) - count:]
        self.share(taken)
        return taken

    def share(self, slots: list[int]) -> None:
        """A sequence holds these slots too (a prompt's cached start)."""
        self.used += _hold(self._users, slots)

    def release(self, slots: list[int]) -> None:
        """A sequence lets go of its slots."""
        self.used -= self._let_go(self._users, self._kept, slots)

    def cache(self, slots: list[int]) -> None:
        """A sequence the prefix cache keeps holds these slots (kept sequences may overlap)."""
        self.cached += _hold(self._kept, slots)

    def uncache(self, slots: list[int]) -> None:
        """A kept sequence the prefix cache evicts lets go of its slots."""
        self.cached -= self._let_go(self._kept, self._users, slots)

    def _let_go(self, counts: np.ndarray, others: np.ndarray, slots: list[int]) -> int:
        """One holder fewer of each slot in `counts`; a slot left with none there and none in
        `others` is free. Returns how many slots `counts` holds no more."""
        index = np.asarray(slots, dtype=np.int64)
        counts[index] -= 1
        gone = index[counts[index] == 0]
        self._free.extend(gone[others[gone] == 0].tolist())
        return len(gone)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Store tokens' keys and values (tokens, kv heads, dim) in their slots (tokens,)."""
        self.keys[layer].index_copy_(0, slots, keys)
        self.values[layer].index_copy_(0, slots, values)

    def gather(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values in the slots of `index` (rows, columns), as (rows, kv heads,
        columns, dim), in the pool's scratch buffers: valid until the next gather. A fresh
        tensor a gather cost 0.7 ms at 16 rows on the 4M bench model, most of it faulting in
        newly mapped pages, against 0.03 ms into memory already touched."""
        rows, columns = index.shape
        flat, count = index.reshape(-1), rows * columns
        if count > self._scratch[0].shape[0]:
            self._scratch = [torch.empty((max(count, 2 * self._scratch[0].shape[0]),
                                          *self.keys[0].shape[1:]), dtype=self.keys[0].dtype,
                                         device=self.device) for _ in range(2)]
        return tuple(torch.index_select(pool[layer], 0, flat, out=scratch[:count])
                     .view(rows, columns, *pool[layer].shape[1:]).transpose(1, 2)
                     for pool, scratch in zip((self.keys, self.values), self._scratch))

    def read(self, slots: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A sequence's keys and values per layer, (1, kv heads, tokens, dim): copies."""
        index = torch.tensor(slots, device=self.device)
        return tuple([pool[layer].index_select(0, index).transpose(0, 1).unsqueeze(0)
                      for layer in range(len(pool))] for pool in (self.keys, self.values))


def _hold(counts: np.ndarray, slots: list[int]) -> int:
    """Count one more holder of each slot (a list without repeats); return how many slots had
    none before."""
    index = np.asarray(slots, dtype=np.int64)
    counts[index] += 1
    return int(np.count_nonzero(counts[index] == 1))


@dataclass
class PassSlots:
    """Where a packed pass's keys and values go, and what each of its parts attends to."""

    written: torch.Tensor  # (tokens,): each packed token's slot, the rows' first
    rows: torch.Tensor | None = None  # (rows, columns): each row's slots, this step's included
    # (rows, 1, 1, columns), float32: 0 where a row attends, -inf on its padding; one row: None
    row_bias: torch.Tensor | None = None
    # per prompt part: its prompt's slots up to the part's end, when tokens came before it
    contexts: list[torch.Tensor | None] = field(default_factory=list)


class SlotTable:
    """The running rows' slots, row by row, in a table that pads with PAD."""

    def __init__(self, device: torch.device):
        self.device = device
        self.lengths: list[int] = []  # each row's computed tokens
        self._table = torch.full((MIN_ROWS, MIN_COLUMNS), PAD, dtype=torch.long, device=device)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def add(self, slots: list[int]) -> None:
        """A new last row, holding these slots' tokens."""
        self._make_room(self.rows + 1, len(slots) + 1)
        self._table[self.rows, :len(slots)] = torch.tensor(slots, device=self.device)
        self.lengths.append(len(slots))

    def slots(self, row: int) -> list[int]:
        return self._table[row, :self.lengths[row]].tolist()

    def open_column(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Give each row one more slot, for the token this step computes; return the rows'
        slots with it (rows, columns) and the attention bias (rows, 1, 1, columns: -inf on a
        row's padding; None for one row, which has none). The column joins the rows at
        `advance()`; a step retried before that opens the same one again."""
        rows, width = self.rows, max(self.lengths) + 1
        self._make_room(rows, width)
        lengths = torch.tensor(self.lengths, device=self.device)
        self._table[torch.arange(rows, device=self.device), lengths] = torch.tensor(
            slots, device=self.device)
        if rows == 1:
            return self._table[:1, :width], None
        padding = torch.arange(width, device=self.device) > lengths[:, None]
        bias = torch.zeros((rows, 1, 1, width), device=self.device).masked_fill_(
            padding[:, None, None, :], float("-inf"))
        return self._table[:rows, :width], bias

    def advance(self) -> None:
        """The opened column is written: every row is one longer."""
        self.lengths = [length + 1 for length in self.lengths]

    def keep(self, rows: list[int]) -> tuple[list[int], list[list[int]]]:
        """Keep only these rows (ascending), filling each freed slot with a row from the end.
        Returns the kept rows' old indices in their new order, and the slots of those dropped."""
        kept, keeping = len(rows), set(rows)
        dropped = [self.slots(i) for i in range(self.rows) if i not in keeping]
        holes, movers, order = compaction(rows)
        if holes:
            self._table[holes] = self._table[movers]
        self._table[kept:self.rows] = PAD
        self.lengths = [self.lengths[i] for i in order]
        return order, dropped

    def _make_room(self, rows: int, columns: int) -> None:
        capacity_rows, capacity_columns = self._table.shape
        if rows <= capacity_rows and columns <= capacity_columns:
            return
        while rows > capacity_rows:
            capacity_rows *= 2
        while columns > capacity_columns:
            capacity_columns *= 2
        table = torch.full((capacity_rows, capacity_columns), PAD, dtype=torch.long,
                           device=self.device)
        old_rows, old_columns = self._table.shape
        table[:old_rows, :old_columns] = self._table
        self._table = table
