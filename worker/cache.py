"""A small least-recently-used cache for models and kept representations.

A worker runs jobs in its own process (see :mod:`fimntk.worker.compute_worker`), so what it caches
survives from one job to the next: a lab re-running operations on the same model does not reload it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    """Keep the ``maxsize`` most recently used values.

    Args:
        maxsize: Capacity; 0 disables caching.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, key: Hashable) -> V | None:
        """The value for ``key``, marked as recently used, or ``None``."""
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value``, evicting the least recently used values past capacity."""
        if self.maxsize == 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def clear(self) -> None:
        """Drop everything (e.g. after a GPU out-of-memory error)."""
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
