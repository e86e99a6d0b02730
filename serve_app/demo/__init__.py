"""The demo dataset shipped with serve_app: a small BEIR-layout corpus written for this project.

Layout of :data:`DEMO_DIR` (see docs/DEMO_DATASET.md)::

    corpus.jsonl        324 documents {"_id", "title", "text", "metadata": {"topic"}} on 12 topics,
                        11 of them long (600-1200 words) to exercise chunking and truncation
    queries.jsonl       101 queries {"_id", "text"}
    qrels/train.tsv     judgements of 70 queries (graded 1 = partly answers, 2 = answers)
    qrels/test.tsv      judgements of the other 31 queries

Read it with :func:`serve_app.corpus.load_beir` (``load_beir(DEMO_DIR, "test")``) or
:func:`serve_app.corpus.load_demo`. The data is part of serve_app and licensed like it
(Apache-2.0). This package only locates the files (it imports nothing of serve_app).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "DEMO_DIR",
    "SPLITS",
    "demo_corpus_path",
    "demo_qrels_path",
    "demo_queries_path",
    "example_queries",
]

#: Directory of the demo dataset inside the installed package.
DEMO_DIR: Path = Path(__file__).resolve().parent

#: The qrels splits shipped with the demo dataset.
SPLITS: tuple[str, ...] = ("train", "test")

# Queries of queries.jsonl that show the funnel at work: the first two share almost no words
# with their answers (BM25 misses them, the bi-encoder finds them), the third is answered by a
# long document (chunking matters), the last two use words with several meanings (bank, batch).
_EXAMPLES: tuple[str, ...] = (
    "what powers the sun",
    "why certain songs send shivers down your spine",
    "origin of the word quarantine",
    "is my money safe if my bank goes bust",
    "how does Ray Serve batch requests for GPU inference",
)


def demo_corpus_path() -> Path:
    """Path of the demo corpus file (``corpus.jsonl``, BEIR format)."""
    return DEMO_DIR / "corpus.jsonl"


def demo_queries_path() -> Path:
    """Path of the demo queries file (``queries.jsonl``)."""
    return DEMO_DIR / "queries.jsonl"


def demo_qrels_path(split: str = "test") -> Path:
    """Path of the qrels TSV of ``split`` (``"train"`` or ``"test"``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown demo split {split!r}; available: {', '.join(SPLITS)}")
    return DEMO_DIR / "qrels" / f"{split}.tsv"


def example_queries() -> list[str]:
    """A few queries of the demo dataset that make good examples (README, ``serve-app demo``)."""
    return list(_EXAMPLES)
