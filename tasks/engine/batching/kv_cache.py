"""The running batch's KV cache on transformers' forward, preallocated so that a decode step
writes in place (our Llama forward keeps its KV in a pool of token slots instead: kv_pool.py).

transformers' DynamicCache concatenates each layer's whole cache with the new column at every
step, so a step copied the batch's entire KV cache. Here each layer has buffers of shape
(row capacity, kv heads, column capacity, head dim). Rows are left-padded to one window of
columns [start, end): a step writes every row's new key and value at column `end`. A finished
row's slot takes the last row (one row copied, not the batch), and `start` moves past columns
no row uses any more. Buffers grow by doubling, and the window moves back to the left when it
reaches the right edge, so copying the whole batch is rare.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from tasks.engine.batching.packed import PackedStep

MIN_ROWS, MIN_COLUMNS = 8, 64  # the first buffers' size; they double from there


class _WindowLayer(DynamicLayer):
    """One model layer's view of the batch cache, in the interface transformers calls."""

    def __init__(self, batch: KVBatch, index: int):
        super().__init__()
        self._batch, self._index = batch, index
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys, self.values = self._batch.write(self._index, key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._batch.width


class KVBatch:
    """The KV cache and attention mask of the running rows, in preallocated buffers."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rows, self.start, self.end = 0, 0, 0
        self.cache: Cache | None = None
        self.packed: PackedStep | None = None  # set during a packed step's forward pass
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._mask = torch.zeros((0, 0), dtype=torch.bool, device=device)

    @property
    def width(self) -> int:
        """Columns in the window: the longest row's cached tokens."""
        return self.end - self.start

    def add(self, cache: DynamicCache, rows: list[int],
            attended: torch.Tensor | None = None) -> None:
        """Append these rows of a prefill's cache as last rows. `attended` is the prefill's
        attention mask (rows, length) when its prompts were left-padded: padding stays masked."""
        index = torch.tensor(rows, device=self.device)
        self.add_rows([layer.keys[index] for layer in cache.layers],
                      [layer.values[index] for layer in cache.layers],
                      None if attended is None else attended[index].bool())

    def add_rows(self, keys: list[torch.Tensor], values: list[torch.Tensor],
                 attended: torch.Tensor | None = None) -> None:
        """Append rows as last rows, from each layer's keys and values (rows, heads, length,
        dim); `attended` (rows, length) masks left padding, if any."""
        count, length = keys[0].shape[0], keys[0].shape[2]
        if self.cache is None:
            self._allocate(keys, values, max(MIN_ROWS, count), max(MIN_COLUMNS, 2 * (length + 1)))
        self._make_room(self.rows + count, max(self.width, length))
        if length > self.width:  # widen the window to the left; old rows are padding there
            self._mask[:self.rows, self.end - length:self.start] = False
            self.start = self.end - length
        new, span = slice(self.rows, self.rows + count), slice(self.end - length, self.end)
        for layer_keys, layer_values, buffer_keys, buffer_values in zip(
                keys, values, self._keys, self._values):
            buffer_keys[new, :, span] = layer_keys
            buffer_values[new, :, span] = layer_values
        self._mask[new, self.start:self.end] = False
        self._mask[new, span] = True if attended is None else attended
        self.rows += count

    def grow(self) -> torch.Tensor:
        """Open the next column for every row; the decode step's attention mask (rows, 1, 1, width
        + 1), True where a row attends. Call `advance()` after the step's forward pass."""
        self._make_room(self.rows, self.width)
        self._mask[:self.rows, self.end] = True
        return self._mask[:self.rows, self.start:self.end + 1][:, None, None, :]

    def advance(self) -> None:
        """The step's column is written in every layer: it joins the window."""
        self.end += 1

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """Store a decode step's keys and values (rows, heads, 1, dim) at column `end`; return the
        layer's window with them. In a packed step they come as (1, heads, tokens, dim), the
        rows' first: the prompts' rest goes to the step (tasks/engine/batching/packed.py)."""
        if self.packed is not None:
            self.packed.hold(layer, keys[:, :, self.rows:], values[:, :, self.rows:])
            keys = keys[0, :, :self.rows].transpose(0, 1).unsqueeze(2)
            values = values[0, :, :self.rows].transpose(0, 1).unsqueeze(2)
        column, window = slice(self.end, self.end + 1), slice(self.start, self.end + 1)
        self._keys[layer][:self.rows, :, column] = keys
        self._values[layer][:self.rows, :, column] = values
        return self._keys[layer][:self.rows, :, window], self._values[layer][:self.rows, :, window]

    def row_cache(self, row: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A row's cached keys and values, (1, heads, its tokens, dim) per layer: the window's
        last columns, as many as the row attends to (it is left-padded to the window)."""
        span = slice(self.end - int(self._mask[row, self.start:self.end].sum()), self.end)
        return ([keys[row:row + 1, :, span] for keys in self._keys],
                [values[row:row + 1, :, span] for values in self._values])

    def keep(self, rows: list[int]) -> list[int]:
        """Keep only these rows (ascending), filling each freed slot with a row from the end.
        Returns the kept rows' old indices in their new order."""
        kept = len(rows)
        holes, movers, order = compaction(rows)
        if holes:
            self._move(holes, movers)
        self.rows = kept
        if kept == 0:
            self.start = self.end  # the buffers stay, for the next rows
        else:
            used = self._mask[:kept, self.start:self.end].any(dim=0)
            self.start += int(used.int().argmax())  # the first column some row still uses
        return order

    def _move(self, holes: list[int], movers: list[int]) -> None:
        target = torch.tensor(holes, device=self.device)
        source = torch.tensor(movers, device=self.device)
        window = slice(self.start, self.end)
        for buffer in (*self._keys, *self._values):
            buffer[target, :, window] = buffer[source, :, window]
        self._mask[target, window] = self._mask[source, window]

    def _allocate(self, keys: list[torch.Tensor], values: list[torch.Tensor], rows: int,
                  columns: int) -> None:
        self._keys = [_buffer(like, rows, columns) for like in keys]
        self._values = [_buffer(like, rows, columns) for like in values]
        self._mask = torch.zeros((rows, columns), dtype=torch.bool, device=self.device)
        self.cache = Cache(layers=[_WindowLayer(self, i) for i in range(len(keys))])

    def _make_room(self, rows: int, width: int) -> None:
        """Ensure room for `rows` rows and a window `width` wide ending at `end`, with a free
        column after it: otherwise copy the window into new buffers, right-aligned at `width`."""
        row_capacity, column_capacity = self._mask.shape
        if rows <= row_capacity and width <= self.end < column_capacity:
            return
        while rows > row_capacity:
            row_capacity *= 2
        while 2 * (width + 1) > column_capacity:  # half the buffer stays free: moves are rare
            column_capacity *= 2
        old = slice(self.start, self.end)
        new = slice(width - self.width, width)
        for buffers in (self._keys, self._values):
            for i, buffer in enumerate(buffers):
                moved = _buffer(buffer, row_capacity, column_capacity)
                moved[:self.rows, :, new] = buffer[:self.rows, :, old]
                buffers[i] = moved
        mask = torch.zeros((row_capacity, column_capacity), dtype=torch.bool, device=self.device)
        mask[:self.rows, new] = self._mask[:self.rows, old]
        self._mask, self.start, self.end = mask, new.start, new.stop


def compaction(rows: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Keeping only `rows` (ascending) of a batch, each freed row below len(rows) taken by a
    kept row from the end: (the freed rows, the rows that move into them, the kept rows' old
    indices in their new order). One row moves per row that left, never the whole batch."""
    kept, keeping = len(rows), set(rows)
    holes = [i for i in range(kept) if i not in keeping]
    movers = [i for i in rows if i >= kept]
    order = list(range(kept))
    for hole, mover in zip(holes, movers):
        order[hole] = mover
    return holes, movers, order


def _buffer(like: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """Zeros (finite, so masked-out columns cannot turn attention into NaN) shaped for a layer."""
    _, heads, _, dim = like.shape
    return torch.zeros((rows, heads, columns, dim), dtype=like.dtype, device=like.device)
