"""A small progress bar (no extra dependency): redraws in place on a terminal, one line per update
otherwise (log files)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int | None, stream: TextIO | None = None, every: int = 10) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self.start = time.monotonic()

    def update(self, it: int, fraction: float, **fields: float | str) -> None:
        if not self.tty and it % self.every and fraction < 1.0:
            return
        width = 24
        filled = int(width * min(max(fraction, 0.0), 1.0))
        bar = "#" * filled + "-" * (width - filled)
        total = f"/{self.total}" if self.total else ""
        parts = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        elapsed = time.monotonic() - self.start
        line = f"[{bar}] {fraction * 100:5.1f}% it {it}{total} {elapsed:6.0f}s {parts}"
        if self.tty:
            self.stream.write("\r" + line[:200])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        self.stream.write(("\n" if self.tty else "") + text + "\n")
        self.stream.flush()
