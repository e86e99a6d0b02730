"""Progress of long jobs, on a terminal and in logs.

Training, index builds (dense encoding), evaluation (reranking) and the demo's first-run
training report their progress through :func:`progress`:

* on a terminal (the stream is a TTY): tqdm's bar, redrawn in place;
* anywhere else (CI, ``nohup``, ``make demo > log``, Kubernetes logs): one plain line every
  ``SERVE_APP_PROGRESS_INTERVAL_S`` seconds (default 30) with the count, the rate and the
  estimated time left, and a last line when the job ends, instead of minutes of silence (or of
  carriage returns a log collector cannot show).

Example (a fake clock; a stream that is not a terminal):

>>> import io
>>> clock = iter([0.0, 10.0, 20.0, 40.0, 41.0]).__next__
>>> out = io.StringIO()
>>> with progress(100, "training", "step", stream=out, interval_s=15, clock=clock) as bar:
...     bar.update(20)   # 10 s: not yet 15 s since the start
...     bar.update(20)   # 20 s: a line
...     bar.update(60)   # 40 s: a line, then the last one at close (41 s)
>>> print(out.getvalue(), end="")
training: 40/100 steps (40%), 2.00 steps/s, about 30 s left
training: 100/100 steps (100%), 2.50 steps/s, about 0 s left
training: done, 100 steps in 41 s (2.44 steps/s)
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Optional, TextIO

ENV_INTERVAL = "SERVE_APP_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 30.0


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (a bar can be redrawn there)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


def interval_from_env() -> float:
    """Seconds between two progress lines: ``SERVE_APP_PROGRESS_INTERVAL_S`` or the default."""
    raw = os.environ.get(ENV_INTERVAL, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_INTERVAL}={raw!r}: give a number of seconds") from None
    if value < 0:
        raise ValueError(f"{ENV_INTERVAL}={raw!r}: give a number of seconds >= 0")
    return value


def _duration(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class LineProgress:
    """Progress as plain lines at a steady interval (see the module docstring). Has the part of
    tqdm's interface the jobs use: ``update``, ``set_postfix``, ``close``, a context manager."""

    def __init__(self, total: Optional[int], desc: str, unit: str, *, initial: int = 0, stream: Optional[TextIO] = None,
                 interval_s: Optional[float] = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = int(initial)
        self.initial = int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_from_env() if interval_s is None else float(interval_s)
        self.clock = clock
        self.started = self.last = clock()
        self.postfix = ""
        self.closed = False

    def _units(self) -> str:
        return self.unit if self.unit.endswith("s") else f"{self.unit}s"

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = self.clock()
        if now - self.last >= self.interval_s:
            self.last = now
            self._write(self.line(now))

    def line(self, now: float) -> str:
        """The progress line at time ``now``."""
        elapsed = now - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total} {self._units()} ({100.0 * self.n / self.total:.0f}%)" if self.total else f"{self.n} {self._units()}"
        text = f"{self.desc}: {done}, {rate:.2f} {self._units()}/s"
        if self.total and rate > 0:
            text += f", about {_duration((self.total - self.n) / rate)} left"
        return text + (f", {self.postfix}" if self.postfix else "")

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        elapsed = self.clock() - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        self._write(f"{self.desc}: done, {self.n} {self._units()} in {_duration(elapsed)} ({rate:.2f} {self._units()}/s)" + (f", {self.postfix}" if self.postfix else ""))

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Silent:
    """No progress (``enabled`` False)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress(total: Optional[int], desc: str, unit: str, *, enabled: bool = True, initial: int = 0, stream: Optional[TextIO] = None,
             interval_s: Optional[float] = None, clock: Callable[[], float] = time.monotonic) -> Any:
    """A progress reporter for ``total`` units: tqdm's bar on a terminal, :class:`LineProgress`
    elsewhere, nothing when not ``enabled``. ``stream`` defaults to standard error."""
    if not enabled:
        return _Silent()
    stream = stream if stream is not None else sys.stderr
    if is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream)
    return LineProgress(total, desc, unit, initial=initial, stream=stream, interval_s=interval_s, clock=clock)
