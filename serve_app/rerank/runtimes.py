"""What executes a scorer's batches: torch, ONNX Runtime or OpenVINO (``reranker.backend``).

Every reranker family has one score module (:class:`~serve_app.rerank.scorer.PairScorer`):
a ``torch.nn.Module`` from a padded batch to one raw score per row. ``torch`` runs it as it is;
``onnx`` and ``openvino`` run its ONNX export.

**The export** (:func:`ensure_export`) is made at first load from the float32 module and
cached in a directory (``reranker.runtime_dir``; by default ``serve_app-runtime/`` inside the
model directory when it is writable, else ``~/.cache/serve_app/runtimes/<key>/``):

* ``score.onnx`` (and ``score.int8.onnx`` with ``quantize: int8``: ONNX Runtime's dynamic
  quantisation, int8 weights of the MatMul/Gemm layers, activations quantised per batch);
* ``export.json``: what it was made from: the checkpoint's files (size and sha256), the score
  module's settings (family, answer tokens, pooling) and the library versions. A later load
  uses the export only when these match, and rebuilds it otherwise.

It is built in a temporary sibling and renamed into place under a file lock (see
:mod:`serve_app.fsutil`), so replicas starting together export once and never read a half
export. ``serve-app export-reranker`` makes one ahead of time (a container image build).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np

from serve_app.errors import IndexLoadError
from serve_app.fsutil import file_lock, read_json, sha256_file, staging_dir, swap_into_place
from serve_app.models import ModelLoadError, resolve_model

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 1
#: The inputs a score module can take (a batch from PairTokenizer or PromptTokenizer).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
EXPORT_META = "export.json"
ONNX_FILE = "score.onnx"
ONNX_INT8_FILE = "score.int8.onnx"
DEFAULT_RUNTIME_ROOT = Path("~/.cache/serve_app/runtimes")
#: Files of a checkpoint that define its scores (weights, configs, tokenizer, ST modules).
_SOURCE_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt")
_SKIP_DIRS = {"serve_app-runtime", ".git", "onnx", "openvino"}


class TorchRuntime:
    """Runs the score module in torch on ``device`` (any dtype; scores as float32)."""

    backend = "torch"

    def __init__(self, module: Any, device: str) -> None:
        self.module = module
        self.device = device

    def __call__(self, batch: dict[str, Any]) -> np.ndarray:
        import torch

        inputs = {name: tensor.to(self.device) for name, tensor in batch.items()}
        with torch.inference_mode():
            return self.module(**inputs).float().cpu().numpy()


def _numpy_inputs(batch: dict[str, Any], names: list[str]) -> dict[str, np.ndarray]:
    return {name: np.asarray(batch[name].numpy() if hasattr(batch[name], "numpy") else batch[name], dtype=np.int64) for name in names}


class OnnxRuntime:
    """Runs an exported score module with ONNX Runtime's CPU provider (all graph optimisations)."""

    backend = "onnx"

    def __init__(self, path: Path, threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelLoadError("reranker.backend=onnx needs onnxruntime: pip install 'serve_app[onnx]' (or onnxruntime)") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, batch: dict[str, Any]) -> np.ndarray:
        return self.session.run(None, _numpy_inputs(batch, self.inputs))[0]


class OpenVinoRuntime:
    """Runs an exported score module with OpenVINO on the CPU, at ``precision`` (f32 or bf16:
    OpenVINO's ``INFERENCE_PRECISION_HINT``; its own default is bf16 on CPUs that have it, so
    float32 is asked for explicitly)."""

    backend = "openvino"

    def __init__(self, path: Path, threads: int, precision: str) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise ModelLoadError("reranker.backend=openvino needs OpenVINO: pip install 'serve_app[openvino]' (or openvino)") from exc
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads})
        # A port can carry several tensor names (the input's and an inner node's): keep the input's.
        self.inputs = [next((n for n in sorted(port.get_names()) if n in MODEL_INPUTS), port.get_any_name()) for port in self.compiled.inputs]
        self._local = threading.local()  # one infer request per thread: a request is not thread-safe

    def __call__(self, batch: dict[str, Any]) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer(_numpy_inputs(batch, self.inputs))
        return np.asarray(request.get_output_tensor(0).data, dtype=np.float32).copy()


# ---------------------------------------------------------------------------- the export


def source_files(model: str, exclude: Optional[Path] = None, root: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """The files of the checkpoint ``model`` (a local directory; resolved like any model name,
    unless the caller gives it resolved as ``root``) that define its scores, by relative path:
    size and mtime (sha256 is added by :func:`fingerprint`). Hidden files, exports and
    ``exclude`` (the export directory) are left out."""
    root = Path(root if root is not None else resolve_model(model))
    skip = exclude.expanduser().resolve() if exclude is not None else None
    if not root.is_dir():
        raise ModelLoadError(f"an ONNX/OpenVINO export needs the checkpoint on local disk; {model!r} is not a local directory (download it first, or give runtime_dir an existing export)")
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or rel.parts[0] in _SKIP_DIRS or any(p.startswith(".") for p in rel.parts) or not path.name.endswith(_SOURCE_SUFFIXES):
            continue
        if skip is not None and (skip == path.resolve() or skip in path.resolve().parents):
            continue
        st = path.stat()
        out[rel.as_posix()] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def fingerprint(model: str, previous: Optional[dict[str, Any]] = None, exclude: Optional[Path] = None, root: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """:func:`source_files` with each file's sha256; a file whose size and mtime equal those in
    ``previous`` (an earlier fingerprint) keeps its recorded sha256 instead of being read again."""
    root = str(root if root is not None else resolve_model(model))
    files = source_files(model, exclude, root)
    base = Path(root)
    previous = previous or {}
    for rel, entry in files.items():
        old = previous.get(rel) or {}
        same = old.get("size") == entry["size"] and old.get("mtime_ns") == entry["mtime_ns"] and "sha256" in old
        entry["sha256"] = old["sha256"] if same else sha256_file(base / rel)
    return files


def default_runtime_dir(model: str, root: Optional[str] = None) -> Path:
    """Where an export of ``model`` (resolved: ``root``) is cached when ``runtime_dir`` is not set."""
    root = Path(root if root is not None else resolve_model(model))
    if root.is_dir() and os.access(root, os.W_OK):
        return root / "serve_app-runtime"
    import hashlib

    return DEFAULT_RUNTIME_ROOT.expanduser() / hashlib.sha256(str(root).encode()).hexdigest()[:16]


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def export_matches(meta: Any, module_key: dict[str, Any], files: dict[str, dict[str, Any]]) -> bool:
    """Whether an export's ``export.json`` was made from these files with these settings."""
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT or meta.get("module") != module_key:
        return False
    recorded = meta.get("source") or {}
    return set(recorded) == set(files) and all(recorded[k].get("sha256") == files[k].get("sha256") for k in files)


def _input_names(module: Any, example: dict[str, Any]) -> list[str]:
    """The batch's inputs in the order of the module's ``forward`` parameters."""
    params = list(inspect.signature(module.forward).parameters)
    names = [p for p in params if p in example]
    extra = set(example) - set(names)
    if extra:
        raise ModelLoadError(f"the score module takes no input named {sorted(extra)}")
    return names


def export_onnx(module: Any, example: dict[str, Any], path: Path) -> list[str]:
    """Export the float32 score module to ONNX at ``path`` (dynamic batch and sequence axes)."""
    import torch

    names = _input_names(module, example)
    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["scores"] = {0: "batch"}
    import warnings

    with torch.inference_mode(), warnings.catch_warnings():
        # The tracer's notes on shape checks it keeps as constants (true for every batch: the
        # traced branch is the one of a prompt longer than one token).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The exporter cautions that aten::index (advanced indexing) is wrong for negative
        # indices. The only aten::index in these graphs is transformers' mask builder reading the
        # padding mask at (batch, key) positions made by torch.arange from 0: never negative.
        # tests/test_rerank_runtimes.py checks every family's export against torch on batches
        # whose padding differs from the example's (the inputs a wrong index would break).
        warnings.filterwarnings("ignore", message=r"Exporting aten::index operator of advanced indexing", category=UserWarning)
        torch.onnx.export(module, tuple(example[n] for n in names), str(path), input_names=names, output_names=["scores"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return names


def quantize_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic int8 quantisation of ``src`` into ``dst``."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise ModelLoadError("reranker.quantize=int8 needs onnxruntime: pip install onnxruntime") from exc
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def ensure_export(model: str, module: Any, module_key: dict[str, Any], example: dict[str, Any], *, runtime_dir: Optional[str], quantize: str, root: Optional[str] = None) -> Path:
    """The ONNX file to run for ``model`` (exported and, with ``quantize: int8``, quantised now
    unless ``runtime_dir`` already holds a matching export); see the module docstring. ``root``:
    ``model`` already resolved by the caller."""
    root = str(root if root is not None else resolve_model(model))
    out = Path(runtime_dir).expanduser() if runtime_dir else default_runtime_dir(model, root)
    wanted = ONNX_INT8_FILE if quantize == "int8" else ONNX_FILE
    with file_lock(out.parent / f".{out.name}.lock"):
        try:
            meta = read_json(out / EXPORT_META, "export metadata") if (out / EXPORT_META).is_file() else None
        except IndexLoadError:  # unreadable: exported again below
            meta = {}
        files = fingerprint(model, meta.get("source") if isinstance(meta, dict) else None, exclude=out, root=root)
        if export_matches(meta, module_key, files) and (out / ONNX_FILE).is_file():
            if (out / wanted).is_file():
                logger.info("reranker %s: using the export in %s", model, out)
                return out / wanted
            partial = out / f".{wanted}.partial"  # add the quantised file to a matching export
            quantize_int8(out / ONNX_FILE, partial)
            os.replace(partial, out / wanted)
            return out / wanted
        if meta is not None:
            logger.warning("reranker %s: the export in %s was made from other files or settings; exporting again", model, out)
        logger.info("reranker %s: exporting the score module to ONNX in %s (once; later loads reuse it)", model, out)
        with staging_dir(out) as tmp:
            inputs = export_onnx(module, example, tmp / ONNX_FILE)
            if quantize == "int8":
                quantize_int8(tmp / ONNX_FILE, tmp / ONNX_INT8_FILE)
            record = {"format": EXPORT_FORMAT, "model": model, "module": module_key, "inputs": inputs, "source": files, "versions": _versions()}
            (tmp / EXPORT_META).write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
            swap_into_place(tmp, out)
    return out / wanted

