"""Incremental decoding and stop sequences, with exact expectations (no model needed)."""
from __future__ import annotations

import pytest

from tasks.worker.textstream import IncrementalDecoder, StopMatcher


def _feed_all(stops: list[str], chunks: list[str]) -> tuple[str, bool]:
    matcher, out = StopMatcher(stops), ""
    for chunk in chunks:
        text, hit = matcher.feed(chunk)
        out += text
        if hit:
            return out, True
    return out + matcher.flush(), False


@pytest.mark.parametrize("stops,chunks,expected,hit", [
    ([], ["Hello", " world"], "Hello world", False),
    (["END"], ["Hello", " world"], "Hello world", False),
    (["END"], ["abcEND", "more"], "abc", True),
    (["END"], ["ab", "cE", "N", "Dx"], "abc", True),  # the stop spans three chunks
    (["END"], ["ab", "cE", "N"], "abcEN", False),  # a partial stop at the end is released
    (["\n\n"], ["line\n", "\nnext"], "line", True),
    (["stop", "op"], ["a st", "op"], "a ", True),  # the earliest match wins
    (["aab"], ["a", "a", "a", "b"], "a", True),  # overlapping partial matches
    (["</s>"], ["x</", "y"], "x</y", False),
])
def test_stop_matcher(stops, chunks, expected, hit):
    assert _feed_all(stops, chunks) == (expected, hit)


def test_stop_matcher_holds_back_only_a_possible_stop_prefix():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abcST") == ("abc", False)
    assert matcher.feed("x") == ("STx", False)


BYTES = {1: b"caf", 2: b"\xc3", 3: b"\xa9", 4: b" ok"}


def _bytes_decode(ids: list[int]) -> str:
    return b"".join(BYTES[i] for i in ids).decode("utf-8", errors="replace")


def test_incremental_decoder_never_splits_a_multibyte_character():
    decoder = IncrementalDecoder(_bytes_decode)
    assert [decoder.push(i) for i in (1, 2, 3, 4)] == ["caf", "", "é", " ok"]
