"""Index-time chunking of long documents and the collapse of chunk hits back to documents.

Retrievers index *chunks* (one per document when chunking is off) and always
answer with *documents*: a document's score is the best score among its chunks.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from serve_app.config import ChunkingConfig
from serve_app.types import Document


def word_windows(text: str, size: int, stride: int) -> list[str]:
    """Split ``text`` into windows of ``size`` words starting every ``stride`` words.

    The last window always reaches the end of the text; a text shorter than one
    window is returned whole.

    >>> word_windows("a b c d e", size=3, stride=2)
    ['a b c', 'c d e']
    """
    words = text.split()
    if len(words) <= size:
        return [" ".join(words)] if words else [""]
    starts = list(range(0, len(words) - size + 1, stride))
    if starts[-1] + size < len(words):
        starts.append(len(words) - size)
    return [" ".join(words[s : s + size]) for s in starts]


def split_documents(docs: Sequence[Document], cfg: ChunkingConfig) -> tuple[list[str], np.ndarray]:
    """Texts to index and, for each text, the position of its document in ``docs``."""
    if not cfg.enabled:
        return [d.content for d in docs], np.arange(len(docs), dtype=np.int64)
    texts: list[str] = []
    owner: list[int] = []
    for i, d in enumerate(docs):
        for w in word_windows(d.content, cfg.size, cfg.stride):
            texts.append(w)
            owner.append(i)
    return texts, np.asarray(owner, dtype=np.int64)


def collapse_to_documents(chunk_ids: np.ndarray, scores: np.ndarray, chunk_owner: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Keep each document's best chunk, best first, at most ``k`` documents.

    ``chunk_ids``/``scores`` are one query's chunk hits sorted by descending score
    (ids < 0, as FAISS pads with, are ignored). Returns (document position, score).
    """
    seen: set[int] = set()
    out: list[tuple[int, float]] = []
    for cid, s in zip(chunk_ids.tolist(), scores.tolist()):
        if cid < 0:
            continue
        d = int(chunk_owner[cid])
        if d in seen:
            continue
        seen.add(d)
        out.append((d, float(s)))
        if len(out) == k:
            break
    return out
