"""What a reranker checkpoint is, read once per load: where it lives and which family it is.

:func:`inspect_checkpoint` resolves the configured model (a local directory, an environment
override, packaged weights or a Hub id; :func:`serve_app.models.resolve_model`) once, and reads
what tells the families apart:

* a Sentence-Transformers ``modules.json`` with a Pooling module is ``pooling`` (its layout is
  read here: :class:`PoolingLayout`), with a LogitScore module (or a text-generation
  Transformer) ``causal_lm``, with a sequence-classification Transformer
  ``sequence_classification``;
* otherwise ``config.json``'s ``architectures``: ``*ForCausalLM`` is ``causal_lm``,
  ``*ForSequenceClassification`` is ``sequence_classification``.

A leaf module: the families and the loader import it; it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from serve_app.config import RerankerModelConfig
from serve_app.fsutil import read_json
from serve_app.models import ModelLoadError, load_config, resolve_model

KINDS = ("sequence_classification", "pooling", "causal_lm")
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
#: torch.nn activations a Dense module may name (Sentence-Transformers saves the class path).
ACTIVATIONS = ("Identity", "Tanh", "Sigmoid", "ReLU", "GELU", "SiLU", "LeakyReLU", "Softplus")


@dataclass(frozen=True)
class Checkpoint:
    """A reranker checkpoint: its configured ``name`` and ``source``, what ``from_pretrained``
    loads (a local directory, or a Hub id read through the cache)."""

    name: str
    source: str

    @classmethod
    def resolve(cls, name: str) -> "Checkpoint":
        return cls(name, resolve_model(name))

    @property
    def local(self) -> bool:
        return Path(self.source).is_dir()

    def file(self, name: str) -> Optional[Path]:
        """``name`` inside the checkpoint, or None when it has no such file."""
        if self.local:
            path = Path(self.source) / name
            return path if path.is_file() else None
        from transformers.utils import cached_file

        try:
            found = cached_file(self.source, name, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
        except OSError:
            return None
        return Path(found) if found else None

    def json(self, name: str) -> Any:
        """The JSON file ``name`` of the checkpoint, None when it has none."""
        path = self.file(name)
        return read_json(path, "checkpoint file") if path is not None else None


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint inspected: its family (``kind``) and what that family needs to know:
    the :class:`PoolingLayout` of a ``pooling`` model, the Sentence-Transformers LogitScore
    settings (or None) of a ``causal_lm`` one, None for ``sequence_classification``."""

    checkpoint: Checkpoint
    kind: str
    details: Any = None


def inspect_checkpoint(cfg: RerankerModelConfig, checkpoint: Optional[Checkpoint] = None) -> CheckpointInfo:
    """The family of ``cfg.model`` (``cfg.kind``, or read from the checkpoint for ``auto``)."""
    ckpt = checkpoint or Checkpoint.resolve(cfg.model)
    modules = ckpt.json("modules.json")
    names = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules] if isinstance(modules, list) else []
    kind = cfg.kind
    details: Any = None
    if names:
        st = ckpt.json("sentence_bert_config.json") or {}
        task = st.get("transformer_task")
        found = "pooling" if "Pooling" in names else "causal_lm" if "LogitScore" in names or task == "text-generation" else "sequence_classification" if task == "sequence-classification" or names == ["Transformer"] else None
        kind = found if kind == "auto" else kind
        if kind == "pooling":
            details = _pooling_layout(ckpt, modules)
        elif kind == "causal_lm" and "LogitScore" in names:
            entry = modules[names.index("LogitScore")]
            details = ckpt.json(f"{entry.get('path', '')}/config.json".lstrip("/"))
    if kind == "auto":
        archs = list(getattr(load_config(ckpt.name, "reranker", source=ckpt.source), "architectures", None) or [])
        if any(a.endswith("ForCausalLM") for a in archs):
            kind = "causal_lm"
        elif any(a.endswith("ForSequenceClassification") for a in archs):
            kind = "sequence_classification"
        else:
            raise ModelLoadError(f"cannot tell which kind of reranker {cfg.model!r} is (architectures {archs}, no Sentence-Transformers modules.json); set reranker.kind to one of {', '.join(KINDS)}")
    if kind == "pooling" and details is None:
        raise ModelLoadError(f"reranker.kind=pooling needs a Sentence-Transformers modular cross-encoder (modules.json with Transformer, Pooling, Dense); {cfg.model!r} has none")
    return CheckpointInfo(ckpt, kind, details)


def detect_kind(cfg: RerankerModelConfig) -> tuple[str, Any]:
    """(family, details) of ``cfg.model`` (:func:`inspect_checkpoint`)."""
    info = inspect_checkpoint(cfg)
    return info.kind, info.details


def _pooling_layout(ckpt: Checkpoint, modules: list[dict[str, Any]]) -> "PoolingLayout":
    root = ckpt.source
    if not ckpt.local:  # a Hub repo: its module files through the cache
        from huggingface_hub import snapshot_download

        try:
            root = snapshot_download(root, allow_patterns=["modules.json", "*config*.json", "*_Dense/*", "*_Pooling/*"])
        except Exception as exc:  # noqa: BLE001 - offline, missing repo: not loadable
            raise ModelLoadError(f"could not read the Sentence-Transformers modules of {ckpt.name!r}: {exc}") from exc
    return read_layout(Path(root), modules)


@dataclass(frozen=True)
class DenseSpec:
    in_features: int
    out_features: int
    bias: bool
    activation: str
    weights: Path


@dataclass(frozen=True)
class PoolingLayout:
    """A Sentence-Transformers modular cross-encoder directory, read."""

    transformer_path: str
    modes: tuple[str, ...]
    embedding_dimension: int
    dense: tuple[DenseSpec, ...] = field(default=())


def _module_kind(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1]


def read_layout(root: Path, modules: list[dict[str, Any]]) -> PoolingLayout:
    """The pooling layout of the directory ``root`` from its ``modules.json`` entries."""

    kinds = [_module_kind(m.get("type", "")) for m in modules]
    if not kinds or kinds[0] != "Transformer" or "Pooling" not in kinds:
        raise ModelLoadError(f"{root}: a pooling cross-encoder needs modules Transformer -> Pooling -> Dense...; modules.json lists {kinds}")
    settings = root / "config_sentence_transformers.json"
    if settings.is_file():
        st = read_json(settings, "Sentence-Transformers settings")
        if st.get("default_prompt_name") or any(st.get("prompts") or {}):
            raise ModelLoadError(f"{root}: the cross-encoder defines prompts ({sorted(st.get('prompts') or {})}); serve_app does not apply Sentence-Transformers prompts, so it would score differently")
    transformer_path = modules[0].get("path", "")
    pool: Optional[dict[str, Any]] = None
    dense: list[DenseSpec] = []
    for entry, kind in zip(modules[1:], kinds[1:]):
        path = root / entry.get("path", "")
        if kind == "Pooling" and pool is None and not dense:
            pool = read_json(path / "config.json", "Pooling config")
        elif kind == "Dense" and pool is not None:
            cfg = read_json(path / "config.json", "Dense config")
            activation = str(cfg.get("activation_function", "torch.nn.modules.linear.Identity")).rsplit(".", 1)[-1]
            if activation not in ACTIVATIONS:
                raise ModelLoadError(f"{path}: Dense activation {cfg.get('activation_function')!r} is not one of torch.nn's {', '.join(ACTIVATIONS)}")
            weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
            if weights is None:
                raise ModelLoadError(f"{path}: Dense module without weights (model.safetensors or pytorch_model.bin)")
            dense.append(DenseSpec(int(cfg["in_features"]), int(cfg["out_features"]), bool(cfg.get("bias", True)), activation, weights))
        else:
            raise ModelLoadError(f"{root}: module {entry.get('type')!r} at position {entry.get('idx')} is not supported in a pooling cross-encoder (Transformer -> Pooling -> Dense...)")
    assert pool is not None
    mode = pool.get("pooling_mode")
    if mode is None:  # the older boolean keys
        legacy = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
        mode = [m for k, m in legacy.items() if pool.get(k)] or ["mean"]
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise ModelLoadError(f"{root}: pooling mode(s) {bad} not among {POOLING_MODES}")
    dim = int(pool.get("embedding_dimension", pool.get("word_embedding_dimension", 0)))
    width = dim * len(modes)
    for d in dense:
        if d.in_features != width:
            raise ModelLoadError(f"{root}: a Dense module takes {d.in_features} features where {width} arrive")
        width = d.out_features
    if width != 1:
        raise ModelLoadError(f"{root}: the last module gives {width} values per pair; a reranker needs one score (end with Dense(out_features=1))")
    return PoolingLayout(transformer_path, modes, dim, tuple(dense))
