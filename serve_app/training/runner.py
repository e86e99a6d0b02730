"""One train function for both jobs, called directly (local run) or by Ray Train on every worker.

The function takes a plain config dict (JSON-serialisable, so Ray can ship it to workers)::

    {"job": "train-reranker" | "distill",
     "settings": <RerankerTrainingConfig | DistillConfig as a dict>,
     "data": <PreparedData as a dict>,
     "model_path": <resolved local directory of the base / student model>,
     "triples": [[record, positive, negative, teacher margin], ...], "scale": float,  # distill
     "work_dir": str, "resume_from": str | None, "overwrite": bool}

:func:`train_loop` runs it in this process (:class:`~serve_app.training.engine.LocalSession`);
:func:`ray_train_loop` is the ``train_loop_per_worker`` of :func:`run_with_ray`'s
``TorchTrainer``: the model goes through ``ray.train.torch.prepare_model`` (DDP across workers),
the loader through ``prepare_data_loader`` (a DistributedSampler shard per worker), and
checkpoints and the final model through ``ray.train.report``; the driver then installs the
final model from the last reported checkpoint. The core never imports Ray; only this module
does, lazily.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from serve_app.ray_session import ray_session
from serve_app.training.engine import FitResult, LocalSession, Session, fit, install_directory, latest_checkpoint

logger = logging.getLogger(__name__)

RAY_RUN_NAME = "run"
FINAL_DIR = "model"


def build_task(config: dict[str, Any]) -> tuple[Any, Any]:
    """(task, settings) described by a loop config dict."""
    from serve_app.training.config import DistillConfig, RerankerTrainingConfig
    from serve_app.training.data import PreparedData

    data = PreparedData.from_json(config["data"])
    if config["job"] == "train-reranker":
        from serve_app.training.reranker import RerankerTask

        settings = RerankerTrainingConfig.model_validate(config["settings"])
        return RerankerTask(settings, data, config["model_path"]), settings
    if config["job"] == "distill":
        from serve_app.training.distill import DistillTask

        settings = DistillConfig.model_validate(config["settings"])
        return DistillTask(settings, data, config["triples"], config["scale"], config["model_path"]), settings
    if config["job"] == "distill-reranker":
        from serve_app.training.config import DistillRerankerConfig
        from serve_app.training.distill_reranker import DistillRerankerTask

        settings = DistillRerankerConfig.model_validate(config["settings"])
        lists = [(int(r), list(docs), [float(x) for x in scores]) for r, docs, scores in config["lists"]]
        return DistillRerankerTask(settings, data, lists, config["model_path"], bool(config["from_teacher"])), settings
    raise ValueError(f"unknown job {config['job']!r}")


def train_loop(config: dict[str, Any]) -> FitResult:
    """Run the job in this process; the model is installed into ``settings.out``."""
    import torch

    from serve_app.models import pick_device

    task, settings = build_task(config)
    resume = config.get("resume_from")
    session = LocalSession(
        torch.device(pick_device(settings.loop.device)),
        Path(config["work_dir"]),
        Path(settings.out),
        keep=settings.loop.keep_checkpoints,
        resume_from=Path(resume) if resume else None,
        overwrite=bool(config.get("overwrite")),
    )
    return fit(task, settings.loop, session)


# --------------------------------------------------------------------------- Ray Train


class RaySession(Session):
    """A Ray Train worker: DDP model, sharded loader, checkpoints reported to Ray."""

    def __init__(self, resume_from: Optional[str]) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        super().__init__(ray.train.torch.get_device())
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.resume_from = resume_from

    def prepare_model(self, model: Any) -> Any:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def prepare_loader(self, loader: Any) -> Any:
        import ray.train.torch

        return ray.train.torch.prepare_data_loader(loader)

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Optional[Path]]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                yield Path(d)
        else:
            yield Path(self.resume_from) if self.resume_from else None

    def _report(self, metrics: dict[str, Any], name: str, write: Optional[Callable[[Path], None]]) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if write is not None:
                write(Path(tmp))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)

    def save_checkpoint(self, step: int, write: Callable[[Path], None], metrics: dict[str, Any]) -> None:
        self._report(metrics, f"step-{step:08d}", write)

    def finish(self, write: Optional[Callable[[Path], None]], metrics: dict[str, Any]) -> None:
        def write_final(d: Path) -> None:
            (d / FINAL_DIR).mkdir()
            write(d / FINAL_DIR)  # type: ignore[misc]

        self._report(metrics, "final", write_final if write is not None else None)


def ray_train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the Ray Train job."""
    task, settings = build_task(config)
    fit(task, settings.loop, RaySession(config.get("resume_from")))


def run_with_ray(config: dict[str, Any], *, workers: int, use_gpu: bool = False, cpus_per_worker: int = 1, address: Optional[str] = None) -> str:
    """Run the job as a Ray Train ``TorchTrainer`` with ``workers`` workers; returns its status.

    ``address`` None starts a private local Ray instance bound to 127.0.0.1 (shut down
    afterwards); ``"auto"`` or ``ray://...`` joins an existing cluster, where ``work_dir``
    must be on storage every node reaches. Status: ``completed`` (the final model was
    installed into ``settings.out``) or ``interrupted`` (stopped at ``stop_after_steps``).
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    work_dir = Path(config["work_dir"]).resolve()
    storage = work_dir / "ray"
    if not config.get("resume_from") and storage.exists():
        shutil.rmtree(storage)  # a fresh run must not pick up an older run's checkpoints
    with ray_session(address, num_cpus=None if address else max(workers * cpus_per_worker, 1)):
        trainer = TorchTrainer(
            ray_train_loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}),
            run_config=RunConfig(name=RAY_RUN_NAME, storage_path=str(storage), checkpoint_config=CheckpointConfig(num_to_keep=max(2, int(config["settings"]["loop"]["keep_checkpoints"]) + 1))),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        if result.checkpoint is None:
            raise RuntimeError("the Ray Train run reported no checkpoint")
        with result.checkpoint.as_directory() as d:
            final = Path(d) / FINAL_DIR
            if not final.is_dir():
                return "interrupted"
            install_directory(lambda tmp: _copy_into(final, tmp), Path(config["settings"]["out"]), overwrite=bool(config.get("overwrite")))
        return "completed"


def _copy_into(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)


def resume_checkpoint(work_dir: Path) -> Optional[Path]:
    """Latest checkpoint of a local run (``work_dir/checkpoints``) or a Ray run (``work_dir/ray``)."""
    found = [c for c in (latest_checkpoint(Path(work_dir) / "checkpoints"), latest_checkpoint(Path(work_dir) / "ray")) if c is not None]
    if not found:
        return None
    return max(found, key=lambda p: int(p.name.split("-")[-1]))
