"""Freezing a process's startup heap: what existed stays out of the collector's walks."""
from __future__ import annotations

import gc
import weakref

from dawet.heap import freeze_startup_heap


class _Node:
    def __init__(self):
        self.links: list = [self]  # a cycle: only the collector frees it


def test_startup_objects_are_frozen_garbage_is_freed_and_later_objects_are_collected():
    startup, garbage = _Node(), weakref.ref(_Node())
    try:
        freeze_startup_heap()
        assert garbage() is None  # collected first, not frozen forever
        assert gc.get_freeze_count() > 0
        assert not any(obj is startup for obj in gc.get_objects())  # frozen: never walked
        later = _Node()
        later_ref = weakref.ref(later)
        del later
        gc.collect()
        assert later_ref() is None
    finally:
        gc.unfreeze()
