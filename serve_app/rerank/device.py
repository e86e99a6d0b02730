"""Where and in what precision a reranker computes: threads, the CPU's bfloat16 support, dtypes.

A leaf module: the model families and the loader import it, it imports none of them.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from serve_app.config import RerankerModelConfig
from serve_app.models import ModelLoadError, resolve_dtype

ENV_CPU_DTYPE = "SERVE_APP_RERANKER_CPU_DTYPE"


def set_threads(num_threads: Optional[int]) -> None:
    """``torch.set_num_threads(num_threads)`` (process-wide) when given."""
    if num_threads is None:
        return
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    import torch

    torch.set_num_threads(num_threads)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX) that torch uses."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_auto_dtype() -> str:
    """What ``dtype: auto`` means for a reranker on this CPU (see the module docstring)."""
    override = os.environ.get(ENV_CPU_DTYPE, "").strip()
    if override:
        if override not in ("float32", "bfloat16"):
            raise ModelLoadError(f"{ENV_CPU_DTYPE}={override!r}: use float32 or bfloat16")
        return override
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def target_dtype(cfg: RerankerModelConfig, device: str) -> Any:
    """The torch dtype the reranker computes in on ``device`` (onnx: float32)."""
    import torch

    if cfg.backend == "onnx":
        return torch.float32
    if cfg.dtype == "auto" and not device.startswith("cuda"):
        return torch.bfloat16 if cpu_auto_dtype() == "bfloat16" else torch.float32
    return resolve_dtype(cfg.dtype, device)


def reranker_dtype(cfg: RerankerModelConfig, device: str) -> Any:
    """The dtype a scorer class loads in when built directly (auto: float32 on a CPU, as
    :func:`serve_app.models.resolve_dtype`); :func:`load_scorer` makes the CPU choice."""
    return resolve_dtype(cfg.dtype, device)
