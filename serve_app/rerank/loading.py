"""load_scorer: a reranker checkpoint -> the scorer of its family, on the configured runtime.

1. **Checkpoint and family** (:mod:`serve_app.rerank.checkpoint`): the model is resolved once
   and its family read (``reranker.kind``; ``auto`` reads the checkpoint); the family's scorer
   loads from that resolved source.
2. **dtype** (:func:`serve_app.rerank.device.target_dtype`): on CUDA, auto is bfloat16 (float16 without bf16 support).
   On a CPU, auto is bfloat16 when the CPU computes it natively (AVX512-BF16 or AMX), float32
   otherwise; ``SERVE_APP_RERANKER_CPU_DTYPE=float32|bfloat16`` overrides that choice for a
   whole machine. Why bfloat16: on the SciFact reranker it gave 2.29x the pairs/s of float32
   with a mean Kendall tau of 0.992 and the same top document for every query
   (``benchmarks/cpu_runtimes``, docs/RERANKERS.md has the figures and the quality run);
   without native support it is slower than float32, hence the CPU check.
3. **Runtime** (``reranker.backend``): torch as loaded, or the ONNX export of the score module
   run by ONNX Runtime or OpenVINO (:mod:`serve_app.rerank.runtimes`).
4. **Drift check** (``reranker.drift_check``; ``auto``: on a CPU, not on CUDA): unless the runtime is torch float32, the fixed
   probe (:mod:`serve_app.rerank.drift`) is scored in torch float32 first and again on the
   chosen runtime; the drift is logged and kept in ``scorer.runtime_info`` (``/info`` shows
   it). A runtime past ``reranker.drift_tolerance`` is refused with the figures, except that
   an ``auto`` dtype falls back to float32 (and says so).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from serve_app.config import RerankerModelConfig
from serve_app.models import ModelLoadError, pick_device
from serve_app.rerank.checkpoint import KINDS, CheckpointInfo, detect_kind, inspect_checkpoint  # noqa: F401 - KINDS, detect_kind: re-exported
from serve_app.rerank.device import target_dtype
from serve_app.rerank.drift import PROBE_MAX_LENGTH, drift_report, probe, probe_pairs, violations
from serve_app.rerank.scorer import PairScorer

logger = logging.getLogger(__name__)


def build_scorer(cfg: RerankerModelConfig, info: CheckpointInfo, dtype: Any, num_threads: Optional[int] = None) -> PairScorer:
    """The scorer of the checkpoint's family in torch at ``dtype``."""
    if info.kind == "pooling":
        from serve_app.rerank.pooling import PoolingScorer

        return PoolingScorer(cfg, info.details, num_threads=num_threads, dtype=dtype, checkpoint=info.checkpoint)
    if info.kind == "causal_lm":
        from serve_app.rerank.causal_lm import CausalLMScorer

        scorer = CausalLMScorer(cfg, num_threads=num_threads, dtype=dtype, checkpoint=info.checkpoint)
        if isinstance(info.details, dict):  # a Sentence-Transformers LogitScore: its answer tokens must be ours
            theirs = [info.details.get("true_token_id"), info.details.get("false_token_id")]
            ours = [scorer.pairs.yes_id, scorer.pairs.no_id]
            if theirs != ours:
                raise ModelLoadError(f"{cfg.model!r}: its LogitScore module scores token ids {theirs}, reranker.prompt's yes_token/no_token are {ours}; set prompt.yes_token / prompt.no_token to the model's answer tokens")
        return scorer
    from serve_app.rerank.cross_encoder import CrossEncoderScorer

    return CrossEncoderScorer(cfg, num_threads=num_threads, dtype=dtype, checkpoint=info.checkpoint)


# ----------------------------------------------------------------------------- runtime


def probe_scores(scorer: PairScorer) -> Any:
    """The scorer's scores of the drift probe (not counted as traffic)."""
    limit = min(PROBE_MAX_LENGTH, scorer.max_length) if scorer.kind != "causal_lm" else None
    return scorer.score_with_lengths(probe_pairs(), limit, record=False)[0]


def _runtime_label(backend: str, dtype: Any, quantize: str) -> str:
    name = str(dtype).replace("torch.", "")
    return f"{backend}-{'int8' if quantize == 'int8' else name}"


def on_runtime(base: PairScorer, cfg: RerankerModelConfig, checkpoint: CheckpointInfo, dtype: Any, runtime_info: dict[str, Any]) -> PairScorer:
    """The scorer ``base`` (torch float32, left untouched) running at ``dtype`` on
    ``cfg.backend``: torch gets a converted copy of the score module; onnx/openvino run its
    export (its path in ``runtime_info["export"]``)."""
    import copy

    import torch

    from serve_app.rerank.runtimes import OnnxRuntime, OpenVinoRuntime, TorchRuntime, ensure_export

    info = {**runtime_info, "dtype": str(dtype).replace("torch.", "")}
    if cfg.backend == "torch":
        module = base.module if dtype == torch.float32 else copy.deepcopy(base.module).to(dtype=dtype)
        return base.on_runtime(module, TorchRuntime(module, base.device), dtype, info)
    example = base.pairs.pad(base.pairs.features(probe_pairs()[:2], base.pairs.limits(2, None)))
    key = {**base.export_key(), "max_length": base.max_length}
    path = ensure_export(cfg.model, base.module, key, example, runtime_dir=cfg.runtime_dir, quantize=cfg.quantize, root=checkpoint.checkpoint.source)
    threads = torch.get_num_threads()
    runtime = OnnxRuntime(path, threads) if cfg.backend == "onnx" else OpenVinoRuntime(path, threads, "bf16" if dtype == torch.bfloat16 else "f32")
    return base.on_runtime(None, runtime, dtype, {**info, "export": str(path)})  # the export runs the batches: no torch weights held


def load_scorer(cfg: RerankerModelConfig, *, num_threads: Optional[int] = None) -> PairScorer:
    """The scorer ``cfg`` describes: family, dtype, runtime and drift check (module docstring)."""
    import torch

    checkpoint = inspect_checkpoint(cfg)
    if cfg.backend != "torch":
        cfg = cfg.model_copy(update={"device": "cpu"})
    device = pick_device(cfg.device)
    dtype = target_dtype(cfg, device)
    fp32 = torch.float32
    wanted = cfg.drift_check is True or (cfg.drift_check == "auto" and not device.startswith("cuda"))
    reference_needed = wanted and not (cfg.backend == "torch" and dtype == fp32)
    load_dtype = fp32 if (reference_needed or cfg.backend != "torch") else dtype
    base = build_scorer(cfg, checkpoint, load_dtype, num_threads)
    info: dict[str, Any] = {"backend": cfg.backend, "quantize": cfg.quantize, "device": base.device, "drift": None}
    if load_dtype == dtype and cfg.backend == "torch":  # nothing to convert or compare
        return base.on_runtime(base.module, base.runtime, dtype, {**info, "dtype": str(dtype).replace("torch.", "")})
    reference = probe_scores(base) if reference_needed else None
    scorer = on_runtime(base, cfg, checkpoint, dtype, info)
    if reference is None:
        return scorer
    label = _runtime_label(cfg.backend, dtype, cfg.quantize)
    report = drift_report(label, reference, probe_scores(scorer), probe()[1])
    broken = violations(report, cfg.drift_tolerance)
    logger.info(
        "reranker %s on %s: drift from torch-float32 on %d probe pairs: max |diff| %.3g, Kendall tau %.3f, top-1 %.2f%s",
        cfg.model, label, report.pairs, report.max_abs_diff, report.kendall_tau, report.top1_agreement, f" (past tolerance: {'; '.join(broken)})" if broken else "",
    )
    if broken and cfg.dtype == "auto" and dtype != fp32:
        logger.warning("reranker %s: dtype auto chose %s, which drifts past reranker.drift_tolerance (%s); using float32", cfg.model, label, "; ".join(broken))
        info["auto_fallback"] = f"{label} drifted past the tolerance: {'; '.join(broken)}"
        dtype = fp32
        scorer = on_runtime(base, cfg, checkpoint, dtype, info)
        label = _runtime_label(cfg.backend, dtype, cfg.quantize)
        report = drift_report(label, reference, probe_scores(scorer), probe()[1])
        broken = violations(report, cfg.drift_tolerance)
    if broken:
        raise ModelLoadError(
            f"reranker {cfg.model!r} on {label} drifts from torch float32 past reranker.drift_tolerance: {'; '.join(broken)} "
            f"(probe of {report.pairs} pairs, {report.queries} queries). Use a closer runtime (dtype float32, quantize none), "
            f"or relax drift_tolerance if this drift is acceptable for your data"
        )
    scorer.runtime_info["drift"] = report.as_dict()
    return scorer
