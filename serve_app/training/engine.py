"""The training loop shared by both jobs, run in one process or on Ray Train workers.

:func:`fit` owns everything that is not specific to a model: seeding, AdamW with linear
warm-up and decay, mixed precision, gradient clipping, the per-epoch example order, periodic
dev evaluation with best-model tracking and early stopping, and checkpoints. What differs
between a local run and a Ray Train worker (device, model wrapping, data-loader sharding,
where checkpoints go) is behind :class:`Session`; ``serve_app.training.ray_session`` implements
it for Ray, :class:`LocalSession` for one process.

Checkpoint directory (``step-XXXXXXXX``), state dicts only, no pickle::

    model.safetensors       model weights (safetensors)
    best.safetensors        weights of the best dev evaluation so far, when not the current ones
    optimizer.pt            optimizer.state_dict()  (torch.save; read with weights_only=True)
    scheduler.pt            scheduler.state_dict()
    scaler.pt               GradScaler state (float16 runs only)
    rng-rank<R>.pt          torch CPU/CUDA generator states of worker R
    rng.json                Python ``random`` and legacy numpy generator states
    trainer_state.json      step, epoch, position in the epoch, best metric, history

The example order of an epoch and each example's negatives are pure functions of (seed,
epoch, position), and the checkpoint restores every generator, so a run resumed from a
checkpoint continues exactly as the uninterrupted run would (tested).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import numpy as np

from serve_app.fsutil import staging_dir, swap_into_place
from serve_app.training.config import LoopConfig

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
SUMMARY_FILE = "training_summary.json"


class Task(Protocol):
    """What :func:`fit` needs from a job (cross-encoder fine-tuning, distillation)."""

    def build_model(self) -> Any:
        """The trainable ``torch.nn.Module`` (called after seeding)."""

    def num_examples(self) -> int:
        """Training examples per epoch."""

    def train_examples(self, epoch: int) -> list[Any]:
        """The examples of ``epoch``, in training order (a pure function of the epoch)."""

    def collate(self, examples: list[Any]) -> dict[str, Any]:
        """Tensors of one batch (on the CPU)."""

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        """Scalar loss of a batch (``model`` may be wrapped, e.g. in DistributedDataParallel)."""

    def evaluate(self, model: Any) -> Optional[dict[str, float]]:
        """Dev metrics of the (unwrapped) model, or None without a dev set."""

    # Optional: ``lr_scale(parameter_name) -> float``, a learning-rate multiplier per parameter.

    def export(self, model: Any, directory: Path) -> None:
        """Write the finished model into the empty ``directory``."""


@dataclass
class TrainState:
    """Progress of a run (saved in every checkpoint)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    evals_without_improvement: int = 0
    early_stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class FitResult:
    """How :func:`fit` ended: ``completed``, ``early_stopped`` or ``interrupted`` (``stop_after_steps``)."""

    status: str
    state: TrainState
    total_steps: int
    seconds: float


# --------------------------------------------------------------------------- sessions


class Session:
    """Where a loop runs. This base class is the single-process behaviour without persistence."""

    rank: int = 0
    world_size: int = 1

    def __init__(self, device: Any) -> None:
        self.device = device

    def prepare_model(self, model: Any) -> Any:
        return model.to(self.device)

    def prepare_loader(self, loader: Any) -> Any:
        return loader

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Optional[Path]]:
        """The checkpoint directory to resume from, if any (valid inside the ``with``)."""
        yield None

    def save_checkpoint(self, step: int, write: Callable[[Path], None], metrics: dict[str, Any]) -> None:
        """Persist a checkpoint; ``write(dir)`` fills an empty directory with this worker's files."""

    def finish(self, write: Optional[Callable[[Path], None]], metrics: dict[str, Any]) -> None:
        """Persist the final model; ``write`` is given on rank 0 only."""


class LocalSession(Session):
    """One process: checkpoints under ``work_dir/checkpoints``, the model installed into ``out``."""

    def __init__(self, device: Any, work_dir: Path, out: Path, *, keep: int = 1, resume_from: Optional[Path] = None, overwrite: bool = False) -> None:
        super().__init__(device)
        self.work_dir = Path(work_dir)
        self.out = Path(out)
        self.keep = keep
        self.resume_from = resume_from
        self.overwrite = overwrite

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Optional[Path]]:
        yield self.resume_from

    def save_checkpoint(self, step: int, write: Callable[[Path], None], metrics: dict[str, Any]) -> None:
        root = self.work_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
        tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def finish(self, write: Optional[Callable[[Path], None]], metrics: dict[str, Any]) -> None:
        if write is not None:
            install_directory(write, self.out, overwrite=self.overwrite)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root`` (searched two levels deep), oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p.parent for p in list(root.glob(f"{CHECKPOINT_PREFIX}*/{STATE_FILE}")) + list(root.glob(f"*/{CHECKPOINT_PREFIX}*/{STATE_FILE}"))]
    return sorted(found, key=lambda p: (int(p.name[len(CHECKPOINT_PREFIX):]) if p.name[len(CHECKPOINT_PREFIX):].isdigit() else -1, str(p)))


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint with the highest step under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def install_directory(write: Callable[[Path], None], out: Path, *, overwrite: bool) -> None:
    """Have ``write`` fill a temporary sibling of ``out``, then rename it to ``out``
    (:mod:`serve_app.fsutil`): a crash leaves either no ``out`` or the previous one, never a
    partial directory."""
    out = Path(out)
    if out.exists() and not overwrite and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    with staging_dir(out) as tmp:
        write(tmp)
        swap_into_place(tmp, out)


# --------------------------------------------------------------------------- pieces


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's legacy generator and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_precision(precision: str, device: Any) -> Optional[Any]:
    """The autocast dtype for ``precision`` on ``device``, or None for plain float32."""
    import torch

    on_cuda = getattr(device, "type", str(device)).startswith("cuda")
    if precision == "fp32":
        return None
    if precision == "auto":
        if not on_cuda:
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and not on_cuda:
        warnings.warn("fp16 mixed precision needs CUDA; training in float32", RuntimeWarning, stacklevel=2)
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def unwrap(model: Any) -> Any:
    """The module inside a DistributedDataParallel (or similar) wrapper."""
    return getattr(model, "module", model)


def _param_groups(model: Any, lr: float, weight_decay: float, lr_scale: Callable[[str], float]) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and norms; per-parameter learning-rate multipliers."""
    groups: dict[tuple[bool, float], list[Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name)
        groups.setdefault((decay, float(lr_scale(name))), []).append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale}
        for (decay, scale), params in sorted(groups.items(), key=lambda kv: kv[0])
    ]


def steps_per_epoch(num_examples: int, batch_size: int, world_size: int) -> int:
    """Optimiser steps per epoch on each worker (DistributedSampler pads every shard to the same size)."""
    per_worker = math.ceil(num_examples / world_size)
    return math.ceil(per_worker / batch_size)


class _ListDataset:
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def _state_dict_cpu(model: Any) -> dict[str, Any]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in unwrap(model).state_dict().items()}


def _save_weights(state: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    # Tied parameters share storage; clone so safetensors stores each name on its own.
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(path))


def _load_weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _rng_json() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _restore_rng_json(obj: dict[str, Any]) -> None:
    version, internal, gauss = obj["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = obj["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- the loop


def fit(task: Task, cfg: LoopConfig, session: Session) -> FitResult:
    """Train ``task`` as ``cfg`` says; see the module docstring."""
    import torch
    from serve_app.progress import progress
    from transformers import get_linear_schedule_with_warmup

    started = time.perf_counter()
    rank, world = session.rank, session.world_size
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    model = task.build_model()
    n_examples = task.num_examples()
    if n_examples == 0:
        raise ValueError("no training examples")
    per_epoch = steps_per_epoch(n_examples, cfg.batch_size, world)
    total_steps = per_epoch * cfg.epochs
    state = TrainState()
    best_weights: Optional[dict[str, Any]] = None

    with session.resume_dir() as resume:
        if resume is not None:
            model.load_state_dict(_load_weights(resume / "model.safetensors"))
        model = session.prepare_model(model)
        lr_scale = getattr(task, "lr_scale", None) or (lambda name: 1.0)
        optimizer = torch.optim.AdamW(_param_groups(unwrap(model), cfg.lr, cfg.weight_decay, lr_scale), lr=cfg.lr)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(round(cfg.warmup * total_steps)), total_steps)
        autocast_dtype = resolve_precision(cfg.precision, session.device)
        device_type = getattr(session.device, "type", str(session.device)).split(":")[0]
        scaler = torch.amp.GradScaler(device_type) if autocast_dtype == torch.float16 else None
        if resume is not None:
            optimizer.load_state_dict(torch.load(resume / "optimizer.pt", weights_only=True, map_location="cpu"))
            scheduler.load_state_dict(torch.load(resume / "scheduler.pt", weights_only=True))
            if scaler is not None and (resume / "scaler.pt").is_file():
                scaler.load_state_dict(torch.load(resume / "scaler.pt", weights_only=True))
            saved = json.loads((resume / STATE_FILE).read_text())
            state = TrainState(**saved["state"])
            if (resume / "best.safetensors").is_file():
                best_weights = _load_weights(resume / "best.safetensors")
            elif state.best_step == state.step:
                best_weights = _state_dict_cpu(model)
            _restore_rng_json(json.loads((resume / "rng.json").read_text()))
            rng_file = resume / f"rng-rank{rank}.pt"
            rng = torch.load(rng_file if rng_file.is_file() else resume / "rng-rank0.pt", weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if torch.cuda.is_available() and rng.get("cuda"):
                torch.cuda.set_rng_state_all(rng["cuda"])
            logger.info("resumed from %s at step %d (epoch %d)", resume, state.step, state.epoch)
        else:
            torch.manual_seed(cfg.seed + 1000 * rank)  # dropout differs between workers

    def write_checkpoint(directory: Path) -> None:
        torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, directory / f"rng-rank{rank}.pt")
        if rank != 0:
            return
        _save_weights(_state_dict_cpu(model), directory / "model.safetensors")
        if best_weights is not None and state.best_step != state.step:
            _save_weights(best_weights, directory / "best.safetensors")
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
        torch.save(scheduler.state_dict(), directory / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), directory / "scaler.pt")
        (directory / "rng.json").write_text(json.dumps(_rng_json()))
        (directory / STATE_FILE).write_text(json.dumps({"state": asdict(state), "total_steps": total_steps}, indent=1))

    last_checkpoint_step = -1

    def checkpoint(metrics: dict[str, Any]) -> None:
        nonlocal last_checkpoint_step
        if last_checkpoint_step == state.step:
            return
        session.save_checkpoint(state.step, write_checkpoint, {"step": state.step, **metrics})
        last_checkpoint_step = state.step

    def evaluate() -> dict[str, Any]:
        nonlocal best_weights
        model.eval()
        metrics = task.evaluate(unwrap(model)) or {}
        model.train()
        record: dict[str, Any] = {"step": state.step, "epoch": state.epoch, **metrics}
        if cfg.dev_metric in metrics:
            value = float(metrics[cfg.dev_metric])
            if state.best_metric is None or value > state.best_metric:
                state.best_metric, state.best_step = value, state.step
                state.evals_without_improvement = 0
                best_weights = _state_dict_cpu(model)
            else:
                state.evals_without_improvement += 1
            if rank == 0:
                logger.info("step %d: dev %s = %.4f (best %.4f at step %d)", state.step, cfg.dev_metric, value, state.best_metric, state.best_step)
        state.history.append(record)
        return record

    if cfg.eval_at_start and resume is None:
        evaluate()
    status = "completed"
    recent: list[float] = []
    bar = progress(total_steps, "training", "step", enabled=cfg.show_progress and rank == 0, initial=state.step)
    model.train()
    try:
        while state.epoch < cfg.epochs and status == "completed":
            examples = task.train_examples(state.epoch)
            consumed = state.step_in_epoch * cfg.batch_size * world
            loader = torch.utils.data.DataLoader(
                _ListDataset(examples[consumed:]), batch_size=cfg.batch_size, shuffle=False, collate_fn=task.collate
            )
            loader = session.prepare_loader(loader)
            for batch in loader:
                batch = _to_device(batch, session.device)
                with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = task.loss(model, batch)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.step_in_epoch += 1
                value = float(loss.detach().float().cpu())
                recent = (recent + [value])[-50:]
                bar.update(1)
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", epoch=state.epoch + 1)
                end_of_epoch = state.step_in_epoch == per_epoch
                if end_of_epoch:
                    state.epoch += 1
                    state.step_in_epoch = 0
                state.history.append({"step": state.step, "loss": value})
                if (cfg.eval_every and state.step % cfg.eval_every == 0) or (end_of_epoch and not cfg.eval_every):
                    checkpoint(evaluate())
                    if cfg.patience and state.evals_without_improvement >= cfg.patience:
                        state.early_stopped = True
                        status = "early_stopped"
                elif (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or end_of_epoch:
                    checkpoint({"loss": value})
                if status == "completed" and cfg.stop_after_steps is not None and state.step >= cfg.stop_after_steps and state.step < total_steps:
                    checkpoint({"loss": value})
                    status = "interrupted"
                if status != "completed" or end_of_epoch:
                    break
            if status == "completed" and state.step_in_epoch:
                raise RuntimeError(f"the data loader ended after {state.step_in_epoch} of {per_epoch} steps of epoch {state.epoch + 1}")
        if status == "completed" and not any(h.get("step") == state.step and "loss" not in h for h in state.history):
            evaluate()  # the final weights were not evaluated yet (eval_every does not divide the steps)
    finally:
        bar.close()

    result = FitResult(status=status, state=state, total_steps=total_steps, seconds=time.perf_counter() - started)
    if status == "interrupted":
        return result
    if best_weights is not None:
        unwrap(model).load_state_dict(best_weights)
    summary = {
        "status": status,
        "steps": state.step,
        "total_steps": total_steps,
        "best_step": state.best_step,
        f"best_dev_{cfg.dev_metric}": state.best_metric,
        "train_seconds": round(result.seconds, 1),
    }
    model.eval()

    def export(directory: Path) -> None:
        task.export(unwrap(model), directory)
        (directory / SUMMARY_FILE).write_text(json.dumps({**summary, "history": state.history}, indent=1))

    session.finish(export if rank == 0 else None, summary)
    return result


def _to_device(batch: Any, device: Any) -> Any:
    if hasattr(batch, "to") and not isinstance(batch, (dict, list, tuple)):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
