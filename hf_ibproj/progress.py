"""Progress that reads well on a terminal and off it: tqdm bars on a terminal, plain lines in a log file.

Redirected to a file (a cluster job's log, `nohup`, CI), tqdm's redrawn frames become megabytes of carriage returns;
there a phase prints one plain line every PLAIN_INTERVAL_S seconds (position, rate, time left, the bar's postfix) and
one when it ends. `progress_bar` takes tqdm's arguments either way.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm

PLAIN_INTERVAL_S = 30.0


def on_terminal() -> bool:
    """Whether progress goes to a terminal (tqdm writes to stderr)."""
    return sys.stderr.isatty()


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """tqdm(iterable, **kwargs) where stderr is a terminal, else a `PlainProgress` with the same interface."""
    if on_terminal():
        return tqdm(iterable, **kwargs)
    return PlainProgress(iterable, **kwargs)


class PlainProgress:
    """The part of tqdm's interface the package uses, printing plain lines to stdout (see the module docstring)."""

    def __init__(self, iterable: Any = None, *, total: int | None = None, initial: int = 0, desc: str = "",
                 unit: str = "it", disable: bool = False, leave: bool = True, **_: Any) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.n, self.desc, self.unit = iterable, total, initial, desc, unit
        self.disable, self.leave, self.postfix = disable, leave, ""
        self.started = self.last_print = time.monotonic()
        self.start_n = initial

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last_print >= PLAIN_INTERVAL_S:
            self._print()

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def write(self, text: str) -> None:
        if not self.disable:
            print(text, flush=True)

    def close(self) -> None:
        if self.leave and (self.iterable is not None or self.n > self.start_n):
            self._print(done=True)
        self.leave = False  # one closing line, however often close() is called

    def _print(self, done: bool = False) -> None:
        self.last_print = now = time.monotonic()
        if self.disable:
            return
        elapsed = now - self.started
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        position = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {position} {self.unit}" + (" done" if done else ""), f"{elapsed:.0f} s",
                 f"{rate:.2f} {self.unit}/s"]
        if not done and self.total and rate > 0:
            parts.append(f"{(self.total - self.n) / rate:.0f} s left")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts), flush=True)


def plain_logs_off_terminal() -> None:
    """For the commands: off a terminal, also silence the bars of transformers, datasets and huggingface_hub
    (saving and loading weights, preparing a dataset), which would write redrawn frames into the log."""
    if on_terminal():
        return
    import datasets
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
