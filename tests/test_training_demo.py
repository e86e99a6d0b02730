"""ensure_demo_reranker: trains once, caches, retrains for a new recipe, never leaves a half model.

The recipe is swapped for a tiny one (the tiny test cross-encoder on the tiny dataset) so these
tests exercise the caching, locking and atomic install in seconds; the real recipe's settings
are checked for validity separately.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.training import demo_reranker
from serve_app.training.config import LoopConfig, MiningConfig, RerankerTrainingConfig
from training_fixtures import write_tiny_beir


@pytest.fixture()
def tiny_recipe(monkeypatch, tiny_cross_encoder_dir):
    """Replace the demo recipe by a seconds-long one; returns a list counting training runs."""
    from serve_app.training import jobs

    runs: list[Path] = []
    real_train = jobs.train_reranker
    lr = {"value": 1e-3}

    def settings(dataset: Path, base: Path, out: Path, *, seed: int = 0, show_progress: bool = False) -> RerankerTrainingConfig:
        return RerankerTrainingConfig(
            dataset=str(dataset), base=str(tiny_cross_encoder_dir), out=str(out), negatives_per_query=2,
            mining=MiningConfig(dev_fraction=0.0, hard_negative_depth=5),
            loop=LoopConfig(epochs=1, batch_size=8, lr=lr["value"], max_length=32, seed=seed, show_progress=show_progress),
        )

    def counting_train(cfg, options):
        runs.append(Path(cfg.out))
        return real_train(cfg, options)

    monkeypatch.setattr(demo_reranker, "demo_settings", settings)
    monkeypatch.setattr(jobs, "train_reranker", counting_train)
    runs_and_lr = (runs, lr)
    return runs_and_lr


def test_trains_once_then_reuses_the_cache(tmp_path, tiny_recipe):
    from serve_app.config import CrossEncoderConfig
    from serve_app.rerank.cross_encoder import CrossEncoderScorer

    runs, lr = tiny_recipe
    data = write_tiny_beir(tmp_path / "data")
    cache = tmp_path / "cache" / "demo-reranker"
    path = demo_reranker.ensure_demo_reranker(cache, dataset=data)
    assert path == cache and demo_reranker.is_model_dir(cache) and len(runs) == 1
    scores = CrossEncoderScorer(CrossEncoderConfig(model=str(path))).score([("moon", "planet moon"), ("moon", "bread")])
    assert scores.shape == (2,)
    mtime = (cache / "model.safetensors").stat().st_mtime_ns
    assert demo_reranker.ensure_demo_reranker(cache, dataset=data) == cache
    assert len(runs) == 1 and (cache / "model.safetensors").stat().st_mtime_ns == mtime
    # Run-time settings (the progress bar) are not part of the recipe: still the same model.
    assert demo_reranker.ensure_demo_reranker(cache, dataset=data, show_progress=True) == cache and len(runs) == 1
    # A changed recipe (here: the learning rate) makes the cached model stale.
    lr["value"] = 5e-4
    demo_reranker.ensure_demo_reranker(cache, dataset=data)
    assert len(runs) == 2
    leftovers = sorted(p.name for p in cache.parent.iterdir())
    assert leftovers == [".demo-reranker.lock", "demo-reranker"]  # no temporary or work directories


def test_a_failed_run_leaves_no_model(tmp_path, tiny_recipe, monkeypatch):
    from serve_app.training import engine

    runs, _ = tiny_recipe
    data = write_tiny_beir(tmp_path / "data")
    cache = tmp_path / "cache" / "demo-reranker"
    real_export = engine.install_directory

    def crash_while_writing(write, out, *, overwrite):
        def partial(tmp: Path) -> None:
            write(tmp)  # the whole model is written into the temporary directory...
            raise KeyboardInterrupt("killed")  # ...and the process dies before the rename

        return real_export(partial, out, overwrite=overwrite)

    monkeypatch.setattr(engine, "install_directory", crash_while_writing)
    with pytest.raises(KeyboardInterrupt):
        demo_reranker.ensure_demo_reranker(cache, dataset=data)
    assert not cache.exists()
    assert [p.name for p in cache.parent.iterdir()] == [".demo-reranker.lock"]
    monkeypatch.setattr(engine, "install_directory", real_export)
    assert demo_reranker.is_model_dir(demo_reranker.ensure_demo_reranker(cache, dataset=data))
    assert len(runs) == 2


def test_default_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(demo_reranker.CACHE_ENV, str(tmp_path / "x"))
    assert demo_reranker.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv(demo_reranker.CACHE_ENV)
    assert demo_reranker.default_cache_dir() == Path("~/.cache/serve_app/demo-reranker").expanduser()


def test_the_real_recipe_is_valid_on_the_demo_dataset(minilm_dir, tmp_path):
    from serve_app.corpus import load_beir
    from serve_app.demo import DEMO_DIR

    settings = demo_reranker.demo_settings(Path(DEMO_DIR), minilm_dir, tmp_path / "out")
    assert settings.mining.split == "train" and settings.mining.dev_fraction == 0.0  # test qrels never used
    assert load_beir(settings.dataset, settings.mining.split).qrels


def test_first_run_shows_a_progress_bar_with_an_estimate(tmp_path, tiny_recipe, capfd, monkeypatch):
    """On a terminal the demo's first-run training shows tqdm's bar: steps done, elapsed<remaining."""
    import re

    from serve_app import progress

    monkeypatch.setattr(progress, "is_terminal", lambda stream: True)  # standard error as a terminal
    runs, _ = tiny_recipe
    demo_reranker.ensure_demo_reranker(tmp_path / "cache" / "m", dataset=write_tiny_beir(tmp_path / "data"), show_progress=True)
    assert len(runs) == 1
    err = capfd.readouterr().err
    assert re.search(r"training: +\d+%.*\| *\d+/\d+ \[\d+:\d+<\d+:\d+", err), err[-2000:]


def test_first_run_logs_progress_lines_when_not_on_a_terminal(tmp_path, tiny_recipe, capfd, monkeypatch):
    """`make demo > log`: the first-run training writes progress lines with rate and time left
    (no bar redrawn with carriage returns)."""
    import re

    monkeypatch.setenv("SERVE_APP_PROGRESS_INTERVAL_S", "0")
    runs, _ = tiny_recipe
    demo_reranker.ensure_demo_reranker(tmp_path / "cache" / "m", dataset=write_tiny_beir(tmp_path / "data"))  # the default: progress on
    assert len(runs) == 1
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("training: ")]
    assert lines and re.match(r"training: \d+/\d+ steps \(\d+%\), [\d.]+ steps/s, about .+ left", lines[0]), err[-2000:]
    assert lines[-1].startswith("training: done, ")
    assert not [part for part in err.split("\n") if "training:" in part and "\r" in part]  # our lines are plain lines
