"""Turn a stream of generated token ids into text chunks, honouring stop sequences.

Pure Python: the incremental decoder needs only a `decode(ids) -> str` function.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"  # what a decoder prints for an incomplete UTF-8 sequence


class IncrementalDecoder:
    """Decode token by token without splitting multi-byte characters (TGI's offsets method)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._decode(self._ids[self._prefix_offset:])
        if len(text) > len(prefix) and not text.endswith(REPLACEMENT_CHAR):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return text[len(prefix):]
        return ""


class StopMatcher:
    """Hold back text that may begin a stop sequence; report when one completes.

    The stop string itself, and anything after it, is never released.
    """

    def __init__(self, stops: Sequence[str]):
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop sequence was hit)."""
        buffer = self._pending + text
        hit = self._first_stop(buffer)
        if hit is not None:
            self._pending = ""
            return buffer[:hit], True
        keep = self._longest_partial(buffer)
        self._pending = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def flush(self) -> str:
        """Release held-back text at the end of generation."""
        text, self._pending = self._pending, ""
        return text

    def _first_stop(self, buffer: str) -> int | None:
        positions = [buffer.find(stop) for stop in self._stops]
        found = [p for p in positions if p >= 0]
        return min(found) if found else None

    def _longest_partial(self, buffer: str) -> int:
        """Length of the longest buffer suffix that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:size]):
                    best = size
                    break
        return best


class SpelledTokens:
    """Match the text a StopMatcher releases back to the tokens that spell it, in order.

    Each token waits with its payload until the released text holds all of its own: so a
    token's payload (its log-probabilities) goes out with the last of its text, and a token
    whose text a stop sequence withheld never goes out. A token with no text of its own (the
    first bytes of a character another token completes) goes out once text after it does.
    """

    def __init__(self):
        self._waiting: deque[tuple[str, Any]] = deque()  # (the token's text, its payload)
        self._spare = 0  # released characters not yet matched to a whole token

    def add(self, text: str, payload: Any) -> None:
        """A new token and the text the decoder gave for it."""
        self._waiting.append((text, payload))

    def release(self, size: int) -> list[tuple[str, Any]]:
        """`size` more characters went out: the tokens now wholly out, with their texts."""
        self._spare += size
        out = []
        while self._waiting and self._fits(self._waiting[0][0]):
            text, payload = self._waiting.popleft()
            self._spare -= len(text)
            out.append((text, payload))
        return out

    def cut(self, size: int) -> list[tuple[str, Any]]:
        """The reply ends after `size` more characters (a stop sequence began there): the
        tokens wholly out, then the one partly out with the part that went out; the rest of
        the tokens are withheld."""
        out = self.release(size)
        if self._spare and self._waiting:
            text, payload = self._waiting.popleft()
            out.append((text[:self._spare], payload))
        self._waiting.clear()
        self._spare = 0
        return out

    def rest(self) -> list[tuple[str, Any]]:
        """The reply ended with all its text out: every token still waiting."""
        out, self._waiting, self._spare = list(self._waiting), deque(), 0
        return out

    def _fits(self, text: str) -> bool:
        return len(text) < self._spare or (len(text) == self._spare and bool(text))
