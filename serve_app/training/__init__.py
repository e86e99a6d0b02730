"""Offline training jobs: cross-encoder fine-tuning on relevance labels and Margin-MSE distillation.

Public API::

    from serve_app.training import RerankerTrainingConfig, DistillConfig, RunOptions
    from serve_app.training import train_reranker, distill, ensure_demo_reranker

See docs/TRAINING.md. Importing this package does not import torch, transformers or Ray.
"""

from __future__ import annotations

from typing import Any

from serve_app.training.config import DistillConfig, LoopConfig, MiningConfig, RerankerTrainingConfig

__all__ = [
    "DistillConfig",
    "LoopConfig",
    "MiningConfig",
    "RerankerTrainingConfig",
    "RunOptions",
    "distill",
    "ensure_demo_reranker",
    "train_reranker",
]


def __getattr__(name: str) -> Any:  # lazy: the jobs import torch/transformers
    if name in ("RunOptions", "JobOutcome", "train_reranker", "distill"):
        from serve_app.training import jobs

        return getattr(jobs, name)
    if name == "ensure_demo_reranker":
        from serve_app.training.demo_reranker import ensure_demo_reranker

        return ensure_demo_reranker
    raise AttributeError(name)
