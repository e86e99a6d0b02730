"""Fixtures of the live-write tests: a small built index with BM25 and a tiny bi-encoder, and a writer over it."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.config import BM25Config, ChunkingConfig, DenseConfig, WritesConfig
from serve_app.types import Document

TOPICS = ["protein cell gene dna", "ocean sea river water", "football soccer team player", "music song album band", "space star planet moon", "food bread coffee cheese"]


def docs(n: int = 60, prefix: str = "doc") -> list[Document]:
    """``n`` short documents over a few topics (words the tiny models know)."""
    out = []
    for i in range(n):
        words = TOPICS[i % len(TOPICS)].split()
        out.append(Document(f"{prefix}{i:03d}", f"{' '.join(words[: 2 + i % 3])} study {i} about the {words[i % len(words)]} and results", f"{words[0]} {i}"))
    return out


@pytest.fixture(scope="session")
def tiny_dense(tiny_bi_encoder_dir) -> DenseConfig:
    return DenseConfig(model=str(tiny_bi_encoder_dir), max_length=64)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_dense):
    from serve_app.retrieval.dense import BiEncoder

    return BiEncoder(tiny_dense)


def build(path: Path, corpus, dense: DenseConfig | None, encoder=None, *, shards=None, bm25: BM25Config | None = None, chunking: ChunkingConfig | None = None) -> Path:
    from serve_app.index import build_index

    build_index(corpus, path, bm25=bm25 or BM25Config(), dense=dense, chunking=chunking or ChunkingConfig(), encoder=encoder, show_progress=False, shards=shards)
    return path


@pytest.fixture
def index_dir(tmp_path, tiny_dense, tiny_encoder) -> Path:
    return build(tmp_path / "idx", docs(), tiny_dense, tiny_encoder)


@pytest.fixture
def writer(index_dir, tiny_encoder):
    from serve_app.live.writer import DocumentWriter

    w = DocumentWriter(index_dir, WritesConfig(), encoder=tiny_encoder)
    yield w
    w.close()
