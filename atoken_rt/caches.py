"""A bounded LRU cache (entry count and bytes) for the derived tensors a Session keeps.

A service fed arbitrary sizes must not grow without bound: every cache in the package is bounded
either by construction (one entry per bucket of a finite :class:`~atoken_rt.static.BucketSet`,
one per weight) or by an :class:`LRUCache`. See README "Limits, caches and untrusted input".
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable

import torch


def tensor_bytes(value: Any) -> int:
    """Bytes held by a tensor, or by the tensors of a tuple/list/dict (recursively); else 0."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


class LRUCache:
    """Least-recently-used mapping bounded by ``max_entries`` and ``max_bytes``.

    ``get_or_build(key, build)`` returns the cached value or builds it; a value larger than
    ``max_bytes`` on its own is returned without being kept (so the cache never holds more than
    ``max_bytes``). ``on_evict(key, value)`` is called for each entry dropped. Thread-safe.
    """

    def __init__(self, max_entries: int, max_bytes: int,
                 sizeof: Callable[[Any], int] = tensor_bytes,
                 on_evict: Callable[[Hashable, Any], None] | None = None):
        if max_entries < 1 or max_bytes < 0:
            raise ValueError("LRUCache needs max_entries >= 1 and max_bytes >= 0")
        self.max_entries, self.max_bytes = int(max_entries), int(max_bytes)
        self._sizeof, self._on_evict = sizeof, on_evict
        self._data: OrderedDict = OrderedDict()  # key -> (value, bytes)
        self._bytes = 0
        self._lock = threading.RLock()

    def __getstate__(self) -> dict:
        # Copies and pickles (e.g. copy.deepcopy of a model) start empty: a lock cannot be
        # copied, and derived tensors are rebuilt on demand.
        state = dict(self.__dict__)
        state.update(_data=OrderedDict(), _bytes=0, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key) -> bool:
        return key in self._data

    @property
    def nbytes(self) -> int:
        return self._bytes

    def keys(self) -> list:
        with self._lock:
            return list(self._data)

    def values(self) -> list:
        with self._lock:
            return [v for v, _ in self._data.values()]

    def get(self, key, default=None):
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return default
            self._data.move_to_end(key)
            return hit[0]

    def put(self, key, value) -> None:
        size = int(self._sizeof(value))
        with self._lock:
            self.pop(key)
            if size > self.max_bytes:
                return  # never kept: larger than the whole budget
            self._data[key] = (value, size)
            self._bytes += size
            while len(self._data) > self.max_entries or self._bytes > self.max_bytes:
                old_key, (old, old_size) = self._data.popitem(last=False)
                self._bytes -= old_size
                if self._on_evict is not None:
                    self._on_evict(old_key, old)

    def pop(self, key, default=None):
        with self._lock:
            hit = self._data.pop(key, None)
            if hit is None:
                return default
            self._bytes -= hit[1]
            return hit[0]

    __setitem__ = put

    def get_or_build(self, key, build: Callable[[], Any]):
        value = self.get(key)
        if value is None:
            value = build()
            self.put(key, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0


__all__ = ["LRUCache", "tensor_bytes"]
