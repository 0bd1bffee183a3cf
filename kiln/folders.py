"""A folder's contents read when first used, again when the folder changes (a file added, removed or renamed in it)
and on `refresh()`, as AUTOMATIC1111 reloads its embeddings and LoRA folders. A file replaced in place does not
change the folder: `refresh()` is for that."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class WatchedFolder(Generic[T]):
    """`current()`: what `read(folder)` gave for the folder as it is now; `empty` without a folder (None, or absent)."""

    def __init__(self, folder: Path | None, read: Callable[[Path], T], empty: T) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._read, self._empty = read, empty
        self._lock = threading.Lock()
        self._stamp: int | None = None
        self._content = empty

    def refresh(self) -> None:
        """Read the folder again now."""
        with self._lock:
            self._stamp = None
        self.current()

    def current(self) -> T:
        if self.folder is None or not self.folder.is_dir():
            return self._empty
        stamp = self.folder.stat().st_mtime_ns
        with self._lock:
            if stamp != self._stamp:
                self._content = self._read(self.folder)
                self._stamp = stamp
            return self._content
