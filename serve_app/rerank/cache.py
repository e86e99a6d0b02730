"""A bounded, exact cache of pair scores (least recently used out first).

A reranker scores a (query, document) pair the same way every time, so a pair seen before
need not be scored again: search traffic repeats popular queries, and a cascade or a retry
asks for the same pairs twice. :class:`ScoreCache` keeps the score of each pair under a key
that holds everything the score depends on:

* the model (its configured name and a load generation, so that a reloaded model never
  answers from its predecessor's entries: :meth:`ScoreCache.drop_model` empties them);
* the pair's effective token limit (``max_length`` after ``max_tokens_per_doc``), how a long
  document is read (truncation side, chunk windows) and the decoder prompt's instruction;
* the query text itself and a 16-byte BLAKE2b digest of the document text.

A hit returns the very float the miss stored, so an answer from the cache equals the answer
without it (exact, not approximate). (Scored in two different batches, one pair may differ in
its last bits, cache or not: padding changes the shapes of the matrix products.) Memory is bounded in bytes: every entry is charged
:func:`entry_bytes` (the Python objects it holds, measured on CPython 3.11, the query counted
in full for every entry although entries of one query share one string), and the least
recently used entries are dropped until the total fits ``max_bytes``.

Example:

>>> cache = ScoreCache(max_bytes=1 << 20)
>>> ctx = cache.context("default", 512)
>>> cache.get(ctx, "what is bm25", ["a ranking function", "a fruit"])
[None, None]
>>> cache.put(ctx, "what is bm25", ["a ranking function"], [3.5])
>>> cache.get(ctx, "what is bm25", ["a ranking function", "a fruit"])
[3.5, None]
>>> cache.stats()["hits"], cache.stats()["misses"]
(1, 3)
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Optional, Sequence

#: Bytes charged per entry besides its query: the key tuple (88), the digest (49), the float
#: (24) and the ordered dict's slot and link (~140), rounded up (``sys.getsizeof`` on 3.11).
ENTRY_OVERHEAD_BYTES = 320


def doc_digest(text: str) -> bytes:
    """16-byte BLAKE2b digest of a document's text (what the key holds instead of the text)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def entry_bytes(query: str) -> int:
    """What one entry is charged: the overhead and the query's UTF-8 bytes plus its object header."""
    return ENTRY_OVERHEAD_BYTES + 49 + len(query.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class CacheContext:
    """Everything but the pair that a score depends on (part of every key)."""

    model: str
    generation: int
    max_length: int
    reading: Hashable = ()  # how documents are read: truncation side, chunking, instruction


class ScoreCache:
    """Pair scores by (context, query, document digest), at most ``max_bytes`` charged.

    Thread-safe (the reranker scores in worker threads). ``max_bytes = 0`` keeps nothing.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: "OrderedDict[tuple[CacheContext, str, bytes], tuple[float, int]]" = OrderedDict()
        self._lock = threading.Lock()
        self._generations: dict[str, int] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def context(self, model: str, max_length: int, reading: Hashable = ()) -> CacheContext:
        """The key context of ``model`` as loaded now (its current generation)."""
        return CacheContext(model, self._generations.get(model, 0), int(max_length), reading)

    def get(self, ctx: CacheContext, query: str, documents: Sequence[str], digests: Optional[Sequence[bytes]] = None, *, count: bool = True) -> list[Optional[float]]:
        """Each document's cached score, None for a miss (a hit becomes the most recently used;
        ``count=False`` leaves the hit and miss counters alone: a look before the real lookup)."""
        digests = digests if digests is not None else [doc_digest(d) for d in documents]
        out: list[Optional[float]] = []
        with self._lock:
            for dg in digests:
                key = (ctx, query, dg)
                found = self._entries.get(key)
                if found is None:
                    out.append(None)
                    continue
                self._entries.move_to_end(key)
                out.append(found[0])
        if count:
            hits = sum(1 for s in out if s is not None)
            self.record(hits, len(out) - hits)
        return out

    def record(self, hits: int, misses: int = 0) -> None:
        """Count lookups made with ``get(..., count=False)`` once their outcome is decided."""
        with self._lock:
            self.hits += int(hits)
            self.misses += int(misses)

    def put(self, ctx: CacheContext, query: str, documents: Sequence[str], scores: Iterable[float], digests: Optional[Sequence[bytes]] = None) -> None:
        """Store the scores of ``documents`` (then drop least recently used entries past the bound)."""
        if not self.enabled:
            return
        digests = digests if digests is not None else [doc_digest(d) for d in documents]
        size = entry_bytes(query)
        if size > self.max_bytes:
            return
        with self._lock:
            if ctx.generation != self._generations.get(ctx.model, 0):
                return  # scored by a model that has since been dropped
            for dg, score in zip(digests, scores):
                key = (ctx, query, dg)
                old = self._entries.pop(key, None)
                if old is not None:
                    self.bytes -= old[1]
                self._entries[key] = (float(score), size)
                self.bytes += size
            while self.bytes > self.max_bytes and self._entries:
                _, (_, freed) = self._entries.popitem(last=False)
                self.bytes -= freed
                self.evictions += 1

    def drop_model(self, model: str) -> int:
        """Forget every entry of ``model`` (it was unloaded or reloaded); returns how many."""
        with self._lock:
            self._generations[model] = self._generations.get(model, 0) + 1
            stale = [k for k in self._entries if k[0].model == model]
            for k in stale:
                self.bytes -= self._entries.pop(k)[1]
        return len(stale)

    def stats(self) -> dict[str, Any]:
        """Entries, bytes charged, the bound, hits, misses and evictions since start."""
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
