"""The two jobs end to end: check the paths, prepare (or reload) the data, train, install the model.

``train_reranker(settings, options)`` and ``distill(settings, options)`` are what the CLI
calls. A job keeps its state in a work directory (default ``<out>.work``)::

    prepared.json     the settings and the prepared examples (queries, negatives, texts;
                      for distillation also the teacher margins and the student scale)
    checkpoints/      step-XXXXXXXX checkpoints of a local run
    ray/              the Ray Train storage of a ``--ray-workers`` run

With ``resume`` the prepared examples are read back (so the examples cannot change under a
resumed run) and training continues from the latest checkpoint. After a finished run the
work directory is deleted unless ``keep_work_dir``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from serve_app.errors import UserFacingError
from serve_app.training.config import DistillConfig, DistillRerankerConfig, LoopConfig, MiningConfig, RerankerTrainingConfig
from serve_app.training.data import PreparedData, prepare_queries

logger = logging.getLogger(__name__)

PREPARED_FILE = "prepared.json"
# Settings that may change between a run and its resumption.
RUNTIME_KEYS = ("stop_after_steps", "show_progress", "num_threads", "device", "precision")


class TrainingSetupError(UserFacingError):
    """The output or work directory is in a state the requested run cannot start from."""


@dataclass(frozen=True)
class RunOptions:
    """How a job runs (not what it learns)."""

    work_dir: Optional[Path] = None
    resume: bool = False
    overwrite: bool = False
    keep_work_dir: bool = False
    ray_workers: int = 0
    use_gpu: bool = False
    cpus_per_worker: int = 1
    ray_address: Optional[str] = None


@dataclass(frozen=True)
class JobOutcome:
    """Result of a job: ``status`` is completed, early_stopped or interrupted (``stop_after_steps``)."""

    status: str
    out: Path
    work_dir: Path
    seconds: float
    summary: dict[str, Any]


def default_work_dir(out: str | Path) -> Path:
    out = Path(out).expanduser()
    return out.parent / f"{out.name}.work"


def settings_key(settings: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """``settings`` (a dumped job config) without its run-time loop settings (RUNTIME_KEYS) and
    the top-level keys ``drop``: what must match for two runs to train the same model."""
    key = {k: v for k, v in json.loads(json.dumps(settings)).items() if k not in drop}
    key["loop"] = {k: v for k, v in key.get("loop", {}).items() if k not in RUNTIME_KEYS}
    return key


def _check_dirs(out: Path, work_dir: Path, options: RunOptions) -> None:
    if out.exists() and not out.is_dir():
        raise TrainingSetupError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not options.overwrite:
        raise TrainingSetupError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    if work_dir.exists() and not options.resume:
        if options.overwrite:
            shutil.rmtree(work_dir)
        elif any(work_dir.iterdir()):
            raise TrainingSetupError(f"{work_dir} holds an earlier run: pass --resume to continue it, or --overwrite to start again")


def _resolve_model(name: str, role: str) -> str:
    """The local directory (or Hub id) of ``name``, checked to be loadable."""
    from serve_app.models import load_config, resolve_model

    load_config(name, role)
    return resolve_model(name)


def _run(job: str, settings: Any, options: RunOptions, model_path: str, prepare: Callable[[], dict[str, Any]]) -> JobOutcome:
    from serve_app.training.runner import resume_checkpoint, run_with_ray, train_loop

    started = time.perf_counter()
    out = Path(settings.out).expanduser()
    work_dir = Path(options.work_dir).expanduser() if options.work_dir else default_work_dir(out)
    _check_dirs(out, work_dir, options)
    work_dir.mkdir(parents=True, exist_ok=True)
    prepared_file = work_dir / PREPARED_FILE
    dump = settings.model_dump()
    if options.resume and prepared_file.is_file():
        prepared = json.loads(prepared_file.read_text())
        if prepared.get("job") != job or settings_key(prepared["settings"]) != settings_key(dump):
            raise TrainingSetupError(f"{work_dir} holds a run with other settings; resume with the same settings, or pass --overwrite to start again")
        logger.info("reusing the prepared examples of %s", prepared_file)
    else:
        prepared = {"job": job, "settings": dump, **prepare()}
        tmp = prepared_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(prepared))
        tmp.replace(prepared_file)
    resume_from = resume_checkpoint(work_dir) if options.resume else None
    if options.resume and resume_from is None:
        logger.info("no checkpoint in %s: starting from the first step", work_dir)
    config = {
        **prepared,
        "settings": dump,
        "model_path": model_path,
        "work_dir": str(work_dir.resolve()),
        "resume_from": str(resume_from) if resume_from else None,
        "overwrite": options.overwrite,
    }
    if options.ray_workers > 0:
        status = run_with_ray(config, workers=options.ray_workers, use_gpu=options.use_gpu, cpus_per_worker=options.cpus_per_worker, address=options.ray_address)
    else:
        status = train_loop(config).status
    summary: dict[str, Any] = {}
    summary_file = out / "training_summary.json"
    if status != "interrupted" and summary_file.is_file():
        summary = {k: v for k, v in json.loads(summary_file.read_text()).items() if k != "history"}
        status = summary.get("status", status)
        if not options.keep_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    return JobOutcome(status=status, out=out, work_dir=work_dir, seconds=time.perf_counter() - started, summary=summary)


def _prepared_data(dataset_dir: str, m: MiningConfig, loop: LoopConfig, *, random_pool_size: int) -> PreparedData:
    """The training examples of either job: ``m``'s split of the BEIR dataset, mined as ``m`` says."""
    from serve_app.corpus import load_beir

    return prepare_queries(
        load_beir(dataset_dir, m.split),
        dev_fraction=m.dev_fraction,
        seed=loop.seed,
        max_queries=m.max_queries,
        hard_negatives_from=m.hard_negatives_from,
        hard_negative_depth=m.hard_negative_depth,
        hard_negative_skip=m.hard_negative_skip,
        random_pool_size=random_pool_size,
        dense_model=m.dense_model,
        dense_max_length=m.dense_max_length,
        index=m.index,
        show_progress=loop.show_progress,
        title_queries=m.title_queries,
    )


def train_reranker(settings: RerankerTrainingConfig, options: RunOptions = RunOptions()) -> JobOutcome:
    """Fine-tune a cross-encoder (see ``serve_app.training.reranker``)."""
    base_path = _resolve_model(settings.base, "base")

    def prepare() -> dict[str, Any]:
        data = _prepared_data(settings.dataset, settings.mining, settings.loop, random_pool_size=max(8, 4 * settings.negatives_per_query))
        logger.info("%d training queries, %d dev queries, %d documents", len(data.train), len(data.dev), len(data.docs))
        return {"data": data.to_json()}

    return _run("train-reranker", settings, options, base_path, prepare)


def distill(settings: DistillConfig, options: RunOptions = RunOptions()) -> JobOutcome:
    """Distil a cross-encoder into a bi-encoder with Margin-MSE (see ``serve_app.training.distill``)."""
    from serve_app.training.distill import build_triples, teacher_margins

    student_path = _resolve_model(settings.student, "student")
    teacher_path = _resolve_model(settings.teacher, "teacher")

    def prepare() -> dict[str, Any]:
        m, loop = settings.mining, settings.loop
        data = _prepared_data(settings.dataset, m, loop, random_pool_size=max(8, 4 * settings.triples_per_positive))
        triples = build_triples(data, settings.triples_per_positive, m.random_negatives, loop.seed)
        margins = teacher_margins(data, triples, teacher_path, max_length=settings.teacher_max_length, batch_tokens=settings.teacher_batch_tokens, device=loop.device)
        scale = settings.student_scale
        if scale is None:
            scale = _fitted_scale(data, triples, margins, student_path, loop.max_length, loop.seed)
        logger.info("%d triples from %d training queries, student scale %.3f", len(triples), len(data.train), scale)
        return {"data": data.to_json(), "triples": [[r, p, n, t] for (r, p, n), t in zip(triples, margins)], "scale": float(scale)}

    return _run("distill", settings, options, student_path, prepare)


def distill_reranker(settings: DistillRerankerConfig, options: RunOptions = RunOptions()) -> JobOutcome:
    """Distil a cross-encoder into a smaller one on its scores over the retrievers' candidates
    (see ``serve_app.training.distill_reranker``)."""
    from serve_app.training.distill_reranker import candidate_lists, teacher_scores

    teacher_path = _resolve_model(settings.teacher, "teacher")
    student_path = _resolve_model(settings.student, "student") if settings.student else teacher_path

    def prepare() -> dict[str, Any]:
        m, loop = settings.mining, settings.loop
        data = _prepared_data(settings.dataset, m, loop, random_pool_size=max(8, settings.candidates_per_query))
        lists = candidate_lists(data, settings.candidates_per_query, loop.seed)
        scored = teacher_scores(data, lists, teacher_path, max_length=settings.teacher_max_length, batch_tokens=settings.teacher_batch_tokens, device=loop.device)
        logger.info("%d training queries with %d teacher-scored candidates each", len(scored), settings.candidates_per_query)
        return {"data": data.to_json(), "lists": [[r, d, s] for r, d, s in scored], "from_teacher": settings.student is None}

    return _run("distill-reranker", settings, options, student_path, prepare)


def _fitted_scale(data: PreparedData, triples: list, margins: list[float], student_path: str, max_length: int, seed: int) -> float:
    from serve_app.models import load_pretrained
    from serve_app.training.distill import SCALE_SAMPLE, fit_scale, student_margins

    pick = np.random.default_rng([seed, 6]).permutation(len(triples))[:SCALE_SAMPLE]
    tokenizer, model = load_pretrained(student_path, "student", head="encoder")
    model.eval()
    m = student_margins(model, tokenizer, data, [triples[i] for i in pick], max_length)
    return fit_scale(m, np.asarray([margins[i] for i in pick]))
