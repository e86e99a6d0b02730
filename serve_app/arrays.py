"""A growable 1-D numpy array, shared by the structures that live writes append to."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class GrowingArray:
    """A growable 1-D numpy array: appends are amortised (the buffer doubles); readers use the
    prefix ``a[:n]`` (:meth:`view`), so a reader holding an older view is never disturbed."""

    def __init__(self, values: Any) -> None:
        self.a = np.asarray(values).copy()
        self.n = int(self.a.size)

    def extend(self, values: Sequence[Any]) -> None:
        need = self.n + len(values)
        if need > self.a.size:
            bigger = np.empty(max(need, 2 * self.a.size, 64), dtype=self.a.dtype)
            bigger[: self.n] = self.a[: self.n]
            self.a = bigger
        self.a[self.n : need] = values
        self.n = need

    def view(self) -> np.ndarray:
        return self.a[: self.n]
