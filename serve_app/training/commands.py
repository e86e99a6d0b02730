"""``serve-app train-reranker``, ``serve-app distill`` and ``serve-app distill-reranker``.

Every setting of :mod:`serve_app.training.config` is a flag named after its field
(``hard_negative_depth`` -> ``--hard-negative-depth``) with the field's description as help;
flags left out keep the config's defaults. Run options (``--resume``, ``--overwrite``,
``--work-dir``, ``--ray-workers``...) are not settings and come from :class:`RunOptions`.
"""

from __future__ import annotations

import argparse
import json
import logging
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from serve_app.errors import UserFacingError

logger = logging.getLogger(__name__)


class SettingsError(UserFacingError, ValueError):
    """A flag value the training settings reject."""


def _flag_type(annotation: Any) -> tuple[Any, Any]:
    """(argparse type, choices) of a pydantic field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str, list(typing.get_args(annotation))
    if origin is typing.Union and len(args) == 1:
        return _flag_type(args[0])
    if annotation in (int, float, str):
        return annotation, None
    return str, None


def _add_fields(parser: argparse._ArgumentGroup, model: type[BaseModel], dest_prefix: str, skip: tuple[str, ...] = ()) -> None:
    for name, field in model.model_fields.items():
        if name in skip or isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            continue
        flag = "--" + name.replace("_", "-")
        dest = f"{dest_prefix}{name}"
        help_text = field.description or ""
        if field.annotation is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        typ, choices = _flag_type(field.annotation)
        required = field.is_required()
        default_note = "" if required else f" (default: {field.get_default(call_default_factory=True)})"
        metavar = None if choices else name.upper()
        parser.add_argument(flag, dest=dest, type=typ, choices=choices, metavar=metavar, default=None, required=required, help=help_text + default_note)


def _collect(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run options")
    g.add_argument("--work-dir", type=Path, default=None, help="Checkpoints and prepared examples (default: <out>.work).")
    g.add_argument("--resume", action="store_true", help="Continue the run kept in the work directory from its latest checkpoint.")
    g.add_argument("--overwrite", action="store_true", help="Replace an existing output directory and discard an earlier run's work directory.")
    g.add_argument("--keep-work-dir", action="store_true", help="Keep the work directory (checkpoints) after a finished run.")
    g.add_argument("--ray-workers", type=int, default=0, help="Run as a Ray Train job (TorchTrainer) with this many workers; 0 trains in this process.")
    g.add_argument("--use-gpu", action="store_true", help="Ray Train: give each worker a GPU.")
    g.add_argument("--cpus-per-worker", type=int, default=1, help="Ray Train: CPUs reserved per worker.")
    g.add_argument("--ray-address", default=None, help="Ray Train: cluster to join (auto, ray://host:port); default starts a local instance on 127.0.0.1.")


def _add_common(parser: argparse.ArgumentParser) -> None:
    from serve_app.training.config import LoopConfig, MiningConfig

    _add_fields(parser.add_argument_group("examples and negatives"), MiningConfig, "mining__")
    loop = parser.add_argument_group("training loop")
    _add_fields(loop, LoopConfig, "loop__", skip=("show_progress", "num_threads"))
    loop.add_argument("--threads", dest="loop__num_threads", type=int, metavar="N", default=None, help=LoopConfig.model_fields["num_threads"].description)
    loop.add_argument("--no-progress", dest="loop__show_progress", action="store_false", default=None, help="No progress bar.")
    _add_run_options(parser)


def _settings(model: type[BaseModel], args: argparse.Namespace) -> Any:
    top = {k: v for k, v in vars(args).items() if k.startswith("top__") and v is not None}
    values = {k[len("top__"):]: v for k, v in top.items()}
    try:
        return model(**values, mining=_collect(args, "mining__"), loop=_collect(args, "loop__"))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise SettingsError(f"invalid training settings: {problems}") from None


def _options(args: argparse.Namespace) -> Any:
    from serve_app.training.jobs import RunOptions

    if args.ray_workers < 0:
        raise SettingsError(f"--ray-workers must be >= 0, got {args.ray_workers}")
    return RunOptions(
        work_dir=args.work_dir,
        resume=args.resume,
        overwrite=args.overwrite,
        keep_work_dir=args.keep_work_dir,
        ray_workers=args.ray_workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        ray_address=args.ray_address,
    )


def _report(outcome: Any) -> int:
    if outcome.status == "interrupted":
        print(f"stopped at a checkpoint in {outcome.work_dir}; continue with the same command and --resume")
        return 0
    print(json.dumps({"status": outcome.status, "out": str(outcome.out), "seconds": round(outcome.seconds, 1), **outcome.summary}, indent=1))
    return 0


def _train_reranker(args: argparse.Namespace) -> int:
    from serve_app.training.config import RerankerTrainingConfig
    from serve_app.training.jobs import train_reranker

    return _report(train_reranker(_settings(RerankerTrainingConfig, args), _options(args)))


def _distill(args: argparse.Namespace) -> int:
    from serve_app.training.config import DistillConfig
    from serve_app.training.jobs import distill

    return _report(distill(_settings(DistillConfig, args), _options(args)))


def _distill_reranker(args: argparse.Namespace) -> int:
    from serve_app.training.config import DistillRerankerConfig
    from serve_app.training.jobs import distill_reranker

    return _report(distill_reranker(_settings(DistillRerankerConfig, args), _options(args)))


def register(subparsers: Any) -> None:
    """Add ``train-reranker`` and ``distill`` to the ``serve-app`` parser."""
    from serve_app.training.config import DistillConfig, DistillRerankerConfig, RerankerTrainingConfig

    p = subparsers.add_parser(
        "train-reranker",
        help="fine-tune a cross-encoder on a BEIR dataset's relevance labels",
        description="Fine-tune a cross-encoder (1-logit sequence classifier) from an encoder or cross-encoder checkpoint on qrels, with hard negatives from BM25/dense. See docs/TRAINING.md.",
    )
    _add_fields(p.add_argument_group("job"), RerankerTrainingConfig, "top__")
    _add_common(p)
    p.set_defaults(func=_train_reranker)

    d = subparsers.add_parser(
        "distill",
        help="distil a cross-encoder into a bi-encoder (Margin-MSE)",
        description="Score (query, positive, negative) triples with a cross-encoder teacher and train a bi-encoder to match its score margins. See docs/TRAINING.md.",
    )
    _add_fields(d.add_argument_group("job"), DistillConfig, "top__")
    _add_common(d)
    d.set_defaults(func=_distill)

    r = subparsers.add_parser(
        "distill-reranker",
        help="distil a cross-encoder into a smaller cross-encoder (the cheap stage of a rerank cascade)",
        description="Score each training query's retrieved candidates with a large reranker and train a small cross-encoder (the teacher's lower layers, or --student) to match them (listwise KL or Margin-MSE). See docs/TRAINING.md.",
    )
    _add_fields(r.add_argument_group("job"), DistillRerankerConfig, "top__")
    _add_common(r)
    r.set_defaults(func=_distill_reranker)
