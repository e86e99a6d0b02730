"""load_scorer: a reranker checkpoint -> the scorer of its family, on the configured runtime.

1. **Family** (``reranker.kind``; ``auto`` reads the checkpoint): a Sentence-Transformers
   ``modules.json`` with a Pooling module is ``pooling``, with a LogitScore module (or a
   text-generation Transformer) ``causal_lm``, with a sequence-classification Transformer
   ``sequence_classification``; otherwise ``config.json``'s ``architectures``: ``*ForCausalLM``
   is ``causal_lm``, ``*ForSequenceClassification`` is ``sequence_classification``.
2. **dtype** (:func:`target_dtype`): on CUDA, auto is bfloat16 (float16 without bf16 support).
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
import os
from pathlib import Path
from typing import Any, Optional

from serve_app.config import CrossEncoderConfig
from serve_app.models import ModelLoadError, load_config, pick_device, resolve_dtype, resolve_model
from serve_app.rerank.scorer import PairScorer, _Counters, ScoreStats

logger = logging.getLogger(__name__)

ENV_CPU_DTYPE = "SERVE_APP_RERANKER_CPU_DTYPE"
KINDS = ("sequence_classification", "pooling", "causal_lm")
#: Probe pairs are scored at most this many tokens long (the check must stay cheap).
PROBE_MAX_LENGTH = 256


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


def target_dtype(cfg: CrossEncoderConfig, device: str) -> Any:
    """The torch dtype the reranker computes in on ``device`` (onnx: float32)."""
    import torch

    if cfg.backend == "onnx":
        return torch.float32
    if cfg.dtype == "auto" and not device.startswith("cuda"):
        return torch.bfloat16 if cpu_auto_dtype() == "bfloat16" else torch.float32
    return resolve_dtype(cfg.dtype, device)


def reranker_dtype(cfg: CrossEncoderConfig, device: str) -> Any:
    """The dtype a scorer class loads in when built directly (auto: float32 on a CPU, as
    :func:`serve_app.models.resolve_dtype`); :func:`load_scorer` makes the CPU choice."""
    return resolve_dtype(cfg.dtype, device)


# ------------------------------------------------------------------------------- family


def checkpoint_file(model: str, name: str) -> Optional[Path]:
    """``name`` inside the checkpoint ``model`` (a directory, or a Hub repo read through the
    local cache or the Hub), or None when it has no such file."""
    root = resolve_model(model)
    if Path(root).is_dir():
        path = Path(root) / name
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(root, name, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None
    return Path(found) if found else None


def _json(path: Optional[Path]) -> Any:
    from serve_app.fsutil import read_json

    return read_json(path, "checkpoint file") if path is not None else None


def detect_kind(cfg: CrossEncoderConfig) -> tuple[str, Any]:
    """(family, details): the pooling layout for ``pooling``, the LogitScore settings (or None)
    for ``causal_lm``, None for ``sequence_classification``."""
    modules = _json(checkpoint_file(cfg.model, "modules.json"))
    names = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules] if isinstance(modules, list) else []
    kind = cfg.kind
    details: Any = None
    if names:
        st = _json(checkpoint_file(cfg.model, "sentence_bert_config.json")) or {}
        task = st.get("transformer_task")
        found = "pooling" if "Pooling" in names else "causal_lm" if "LogitScore" in names or task == "text-generation" else "sequence_classification" if task == "sequence-classification" or names == ["Transformer"] else None
        kind = found if kind == "auto" else kind
        if kind == "pooling":
            details = _pooling_layout(cfg.model, modules)
        elif kind == "causal_lm" and "LogitScore" in names:
            entry = modules[names.index("LogitScore")]
            details = _json(checkpoint_file(cfg.model, f"{entry.get('path', '')}/config.json".lstrip("/")))
    if kind == "auto":
        archs = list(getattr(load_config(cfg.model, "reranker"), "architectures", None) or [])
        if any(a.endswith("ForCausalLM") for a in archs):
            kind = "causal_lm"
        elif any(a.endswith("ForSequenceClassification") for a in archs):
            kind = "sequence_classification"
        else:
            raise ModelLoadError(f"cannot tell which kind of reranker {cfg.model!r} is (architectures {archs}, no Sentence-Transformers modules.json); set reranker.kind to one of {', '.join(KINDS)}")
    if kind == "pooling" and details is None:
        raise ModelLoadError(f"reranker.kind=pooling needs a Sentence-Transformers modular cross-encoder (modules.json with Transformer, Pooling, Dense); {cfg.model!r} has none")
    return kind, details


def _pooling_layout(model: str, modules: list[dict[str, Any]]) -> Any:
    from serve_app.rerank.pooling import read_layout

    root = resolve_model(model)
    if not Path(root).is_dir():  # a Hub repo: its module files through the cache
        from huggingface_hub import snapshot_download

        try:
            root = snapshot_download(root, allow_patterns=["modules.json", "*config*.json", "*_Dense/*", "*_Pooling/*"])
        except Exception as exc:  # noqa: BLE001 - offline, missing repo: not loadable
            raise ModelLoadError(f"could not read the Sentence-Transformers modules of {model!r}: {exc}") from exc
    return read_layout(Path(root), modules)


def build_scorer(cfg: CrossEncoderConfig, kind: str, details: Any, dtype: Any, num_threads: Optional[int] = None) -> PairScorer:
    """The scorer of family ``kind`` in torch at ``dtype``."""
    if kind == "pooling":
        from serve_app.rerank.pooling import PoolingScorer

        return PoolingScorer(cfg, details, num_threads=num_threads, dtype=dtype)
    if kind == "causal_lm":
        from serve_app.rerank.causal_lm import CausalLMScorer

        scorer = CausalLMScorer(cfg, num_threads=num_threads, dtype=dtype)
        if isinstance(details, dict):  # a Sentence-Transformers LogitScore: its answer tokens must be ours
            theirs = [details.get("true_token_id"), details.get("false_token_id")]
            ours = [scorer.pairs.yes_id, scorer.pairs.no_id]
            if theirs != ours:
                raise ModelLoadError(f"{cfg.model!r}: its LogitScore module scores token ids {theirs}, reranker.prompt's yes_token/no_token are {ours}; set prompt.yes_token / prompt.no_token to the model's answer tokens")
        return scorer
    from serve_app.rerank.cross_encoder import CrossEncoderScorer

    return CrossEncoderScorer(cfg, num_threads=num_threads, dtype=dtype)


# ----------------------------------------------------------------------------- runtime


def _probe_scores(scorer: PairScorer) -> Any:
    from serve_app.rerank.drift import probe_pairs

    scores = scorer.score(probe_pairs(), max_length=min(PROBE_MAX_LENGTH, scorer.max_length) if scorer.kind != "causal_lm" else None)
    scorer._counters, scorer.last_stats = _Counters(), ScoreStats()  # the probe is not traffic
    return scores


def _runtime_label(backend: str, dtype: Any, quantize: str) -> str:
    name = str(dtype).replace("torch.", "")
    return f"{backend}-{'int8' if quantize == 'int8' else name}"


def _apply_runtime(scorer: PairScorer, cfg: CrossEncoderConfig, fp32_module: Any, dtype: Any) -> Optional[str]:
    """Make ``scorer`` run at ``dtype`` on ``cfg.backend``, from the float32 score module
    (left untouched: torch gets a converted copy); the export's path for onnx/openvino."""
    import copy

    import torch

    from serve_app.rerank.runtimes import OnnxRuntime, OpenVinoRuntime, TorchRuntime, ensure_export

    scorer.dtype = dtype
    if cfg.backend == "torch":
        scorer.module = fp32_module if dtype == torch.float32 else copy.deepcopy(fp32_module).to(dtype=dtype)
        scorer.runtime = TorchRuntime(scorer.module, scorer.device)
        return None
    from serve_app.rerank.drift import probe_pairs

    example = scorer.pairs.pad(scorer.pairs.features(probe_pairs()[:2], scorer.pairs.limits(2, None)))
    key = {**scorer.export_key(), "max_length": scorer.max_length}
    path = ensure_export(cfg.model, fp32_module, key, example, runtime_dir=cfg.runtime_dir, quantize=cfg.quantize)
    threads = torch.get_num_threads()
    if cfg.backend == "onnx":
        scorer.runtime = OnnxRuntime(path, threads)
    else:
        scorer.runtime = OpenVinoRuntime(path, threads, "bf16" if dtype == torch.bfloat16 else "f32")
    return str(path)


def load_scorer(cfg: CrossEncoderConfig, *, num_threads: Optional[int] = None) -> PairScorer:
    """The scorer ``cfg`` describes: family, dtype, runtime and drift check (module docstring)."""
    import torch

    from serve_app.rerank.drift import drift_report, probe, violations

    kind, details = detect_kind(cfg)
    if cfg.backend != "torch":
        cfg = cfg.model_copy(update={"device": "cpu"})
    device = pick_device(cfg.device)
    dtype = target_dtype(cfg, device)
    fp32 = torch.float32
    wanted = cfg.drift_check is True or (cfg.drift_check == "auto" and not device.startswith("cuda"))
    reference_needed = wanted and not (cfg.backend == "torch" and dtype == fp32)
    load_dtype = fp32 if (reference_needed or cfg.backend != "torch") else dtype
    scorer = build_scorer(cfg, kind, details, load_dtype, num_threads)
    info: dict[str, Any] = {"backend": cfg.backend, "quantize": cfg.quantize, "device": scorer.device, "drift": None}
    if load_dtype == dtype and cfg.backend == "torch":  # nothing to convert or compare
        scorer.runtime_info = {**info, "dtype": str(dtype).replace("torch.", "")}
        return scorer
    fp32_module = scorer.module
    reference = _probe_scores(scorer) if reference_needed else None
    export = _apply_runtime(scorer, cfg, fp32_module, dtype)
    if reference is not None:
        label = _runtime_label(cfg.backend, dtype, cfg.quantize)
        report = drift_report(label, reference, _probe_scores(scorer), probe()[1])
        broken = violations(report, cfg.drift_tolerance)
        logger.info(
            "reranker %s on %s: drift from torch-float32 on %d probe pairs: max |diff| %.3g, Kendall tau %.3f, top-1 %.2f%s",
            cfg.model, label, report.pairs, report.max_abs_diff, report.kendall_tau, report.top1_agreement, f" (past tolerance: {'; '.join(broken)})" if broken else "",
        )
        if broken and cfg.dtype == "auto" and dtype != fp32:
            logger.warning("reranker %s: dtype auto chose %s, which drifts past reranker.drift_tolerance (%s); using float32", cfg.model, label, "; ".join(broken))
            info["auto_fallback"] = f"{label} drifted past the tolerance: {'; '.join(broken)}"
            dtype = fp32
            export = _apply_runtime(scorer, cfg, fp32_module, dtype)
            label = _runtime_label(cfg.backend, dtype, cfg.quantize)
            report = drift_report(label, reference, _probe_scores(scorer), probe()[1])
            broken = violations(report, cfg.drift_tolerance)
        if broken:
            raise ModelLoadError(
                f"reranker {cfg.model!r} on {label} drifts from torch float32 past reranker.drift_tolerance: {'; '.join(broken)} "
                f"(probe of {report.pairs} pairs, {report.queries} queries). Use a closer runtime (dtype float32, quantize none), "
                f"or relax drift_tolerance if this drift is acceptable for your data"
            )
        info["drift"] = report.as_dict()
    if cfg.backend != "torch":
        scorer.module = None  # the export runs the batches: the torch weights are freed
    info["dtype"] = str(dtype).replace("torch.", "")
    if export:
        info["export"] = export
    scorer.runtime_info = info
    return scorer
