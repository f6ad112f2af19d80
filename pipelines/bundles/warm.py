"""Opened models kept between jobs: a worker process loads a model once, not once per job.

A pipeline object lives as long as its worker keeps it warm (the executor drops it to free memory); it
keeps what it opened in a :class:`WarmCache`, keyed by what it opened with and by
:func:`files_signature` of the bundles' folders, so installing, replacing or removing a bundle version
opens the model again on the next job instead of running stale weights.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


def files_signature(models_dir: Path, *names: str) -> tuple[tuple[str, int, int], ...]:
    """(relative path, size, mtime in ns) of every file under ``models_dir/<name>`` for each name: cheap
    (a few ``stat`` calls), and it changes whenever a bundle version is installed, replaced or removed."""
    found: list[tuple[str, int, int]] = []
    for name in names:
        top = models_dir / name
        for folder, _dirs, files in os.walk(top):
            for file in files:
                path = Path(folder) / file
                try:
                    st = path.stat()
                except OSError:
                    continue  # removed meanwhile: the signature differs either way
                found.append((str(path.relative_to(models_dir)), st.st_size, st.st_mtime_ns))
    return tuple(sorted(found))


def bundle_key(models_dir: Path, *names: str) -> tuple[str, tuple[tuple[str, int, int], ...]]:
    """The part of a cache key that names the bundles a model was opened from, as they are on disk now."""
    return str(models_dir.resolve()), files_signature(models_dir, *names)


class WarmCache(Generic[T]):
    """At most ``capacity`` opened values, least recently used evicted (and ``close``d) first."""

    def __init__(self, close: Callable[[T], None], capacity: int = 1) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._close = close
        self._capacity = capacity
        self._items: OrderedDict[Hashable, T] = OrderedDict()
        self.opened = 0  # how many values were opened (not found warm) so far

    def get(self, key: Hashable, open_: Callable[[], T]) -> tuple[T, bool]:
        """The value for ``key`` and whether it was warm; opens (and keeps) it when it is not."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key], True
        value = open_()
        self.opened += 1
        self._items[key] = value
        while len(self._items) > self._capacity:
            _, old = self._items.popitem(last=False)
            self._close(old)
        return value, False

    def clear(self) -> None:
        while self._items:
            _, value = self._items.popitem(last=False)
            self._close(value)

    def __len__(self) -> int:
        return len(self._items)
