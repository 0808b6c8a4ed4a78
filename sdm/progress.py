"""Progress of a long stage on the console: a tqdm bar on a terminal, otherwise a line per share of the work (a log
file gets a few whole lines, not carriage returns)."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


class StageProgress:
    """A `(done, total)` progress callback, as the sampling runner calls it; `close` ends the bar or the lines."""

    def __init__(self, desc: str, unit: str = "step", stream: TextIO | None = None, line_share: float = 0.25):
        self.desc, self.unit, self.stream, self.line_share = desc, unit, stream or sys.stderr, line_share
        self._bar: tqdm | None = None
        self._next = 0.0
        self._tty = self.stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        if self._tty:
            if self._bar is None:
                self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=self.stream)
            self._bar.update(done - self._bar.n)
        elif done >= self._next * total or done == total:
            print(f"{self.desc}: {done}/{total} {self.unit}s ({done / total:.0%})", file=self.stream, flush=True)
            self._next = (done / total // self.line_share + 1) * self.line_share

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
