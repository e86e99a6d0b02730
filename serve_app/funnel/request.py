"""A search request's sizes, resolved and validated (step 1 of the funnel; see :mod:`serve_app.funnel`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from serve_app.config import FunnelLimits
from serve_app.errors import FunnelError, ModelNotFound

KNOWN_RETRIEVERS: tuple[str, ...] = ("bm25", "dense")
#: The name of a reranker's default model (its own fields, not one of ``reranker.models``).
DEFAULT_MODEL = "default"


@dataclass(frozen=True)
class FunnelRequest:
    """A search request as received; None means "use the configured default"."""

    query: str
    top_k: int | None = None
    rerank_top_m: int | None = None
    top_n: int | None = None
    retrievers: Sequence[str] | None = None
    return_documents: bool = False
    reranker: str | None = None
    instruction: str | None = None  # decoder rerankers: the prompt's instruction for this request
    cascade: Mapping[str, int] | None = None  # depth of each cascade stage by name (absent: its default)
    where: Any = None  # a parsed metadata filter (serve_app.filters): every retriever searches only what it admits


@dataclass(frozen=True)
class CascadeDepths:
    """A cascade stage as the funnel sees it: its name, depth limits and how it reorders
    (``CascadeStage``: ``blend`` none or rrf, with ``blend_weight``)."""

    name: str
    default_top_m: int
    max_top_m: int
    blend: str = "none"
    blend_weight: float = 1.0


@dataclass(frozen=True)
class ResolvedFunnel:
    """A validated request with every size decided."""

    query: str
    top_k: int
    rerank_top_m: int
    top_n: int
    retrievers: tuple[str, ...]
    return_documents: bool = False
    reranker: str | None = None  # the configured model's name (None: the only/default one)
    instruction: str | None = None
    cascade: tuple[tuple[str, int], ...] = ()  # (stage, depth) of each cascade stage, in order
    where: Any = None  # the parsed metadata filter, or None

    @property
    def rerank(self) -> bool:
        """Whether the reranker runs for this request."""
        return self.rerank_top_m > 0

    @property
    def pool_size(self) -> int:
        """Most candidates the fused list can hold."""
        return self.top_k * len(self.retrievers)

    def sizes(self) -> dict[str, Any]:
        """The sizes as a plain dict (what ``/search`` reports as ``funnel``; ``reranker`` when one was named)."""
        out: dict[str, Any] = {"top_k": self.top_k, "rerank_top_m": self.rerank_top_m, "top_n": self.top_n, "retrievers": list(self.retrievers)}
        if self.reranker is not None:
            out["reranker"] = self.reranker
        if self.cascade:
            out["cascade"] = {name: depth for name, depth in self.cascade}
        return out


def _check_int(name: str, value: Any, lo: int, hi: int, hi_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise FunnelError(f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise FunnelError(f"{name}={value} is below the minimum {lo}")
    if value > hi:
        raise FunnelError(f"{name}={value} exceeds {hi_name}={hi}")
    return int(value)


def _resolve_retrievers(requested: Sequence[str] | None, available: Sequence[str]) -> tuple[str, ...]:
    if not available:
        raise FunnelError("no retriever is available in this pipeline")
    if requested is None:
        return tuple(available)
    if isinstance(requested, str):
        requested = [requested]
    names = list(requested)
    if not names:
        raise FunnelError(f"retrievers must name at least one of {list(available)}")
    for name in names:
        if name not in available:
            what = "unknown retriever" if name not in KNOWN_RETRIEVERS else "retriever not available in this index"
            raise FunnelError(f"retrievers: {what} {name!r}; available: {list(available)}")
    return tuple(n for n in available if n in names)  # canonical order, duplicates dropped


ModelResolver = Callable[[Optional[str]], Optional[str]]


def single_model(name: Optional[str]) -> Optional[str]:
    """The model resolver of a funnel with one reranker: only its default name is known."""
    if name is None or name == DEFAULT_MODEL:
        return None
    raise ModelNotFound(name, [DEFAULT_MODEL])


def resolve_funnel(
    request: FunnelRequest,
    limits: FunnelLimits,
    available_retrievers: Sequence[str],
    *,
    rerank_available: bool = True,
    models: ModelResolver = single_model,
    cascade: Sequence[CascadeDepths] = (),
) -> ResolvedFunnel:
    """Apply defaults to ``request`` and validate it; raises :class:`FunnelError` naming the field
    (``ModelNotFound`` for a reranker that ``models`` does not know).

    See the module docstring for how defaults interact with the pool size, and for the
    cascade's depths (each at most the one before; defaults are lowered to fit).
    """
    if not isinstance(request.query, str) or not request.query.strip():
        raise FunnelError(f"query must be a non-empty string, got {request.query!r}")
    retrievers = _resolve_retrievers(request.retrievers, list(available_retrievers))

    if request.top_k is None:
        top_k = limits.default_top_k
    else:
        top_k = _check_int("top_k", request.top_k, 1, limits.max_top_k, "max_top_k")
    pool = top_k * len(retrievers)

    if request.rerank_top_m is None:
        rerank_top_m = min(limits.default_rerank_top_m, pool) if rerank_available else 0
    else:
        rerank_top_m = _check_int("rerank_top_m", request.rerank_top_m, 0, limits.max_rerank_top_m, "max_rerank_top_m")
        if rerank_top_m > 0 and not rerank_available:
            raise FunnelError(f"rerank_top_m={rerank_top_m} but this pipeline has no reranker (use 0)")
        if rerank_top_m > pool:
            raise FunnelError(f"rerank_top_m={rerank_top_m} exceeds the candidate pool top_k * retrievers = {top_k} * {len(retrievers)} = {pool}")

    if request.top_n is None:
        top_n = min(limits.default_top_n, pool)
    else:
        top_n = _check_int("top_n", request.top_n, 1, limits.max_top_n, "max_top_n")
        if top_n > pool:
            raise FunnelError(f"top_n={top_n} exceeds the candidate pool top_k * retrievers = {top_k} * {len(retrievers)} = {pool}")
    if request.instruction is not None and (not isinstance(request.instruction, str) or not request.instruction.strip()):
        raise FunnelError(f"instruction must be a non-empty string or null, got {request.instruction!r}")
    reranker = models(request.reranker)
    stages, rerank_top_m = _resolve_cascade(request, cascade, pool, rerank_top_m)
    return ResolvedFunnel(request.query, top_k, rerank_top_m, top_n, retrievers, bool(request.return_documents), reranker, request.instruction, stages, request.where)


def _resolve_cascade(request: FunnelRequest, cascade: Sequence[CascadeDepths], pool: int, rerank_top_m: int) -> tuple[tuple[tuple[str, int], ...], int]:
    """The depth of each cascade stage and the final reranker's (see :func:`resolve_funnel`)."""
    wanted = request.cascade
    if wanted is None:
        wanted = {}
    if not isinstance(wanted, Mapping):
        raise FunnelError(f"cascade must map stage names to depths, got {type(wanted).__name__}")
    names = [c.name for c in cascade]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise FunnelError(f"cascade: unknown stage {unknown[0]!r}; stages: {names}" if names else "cascade: this pipeline has no cascade stages")
    out: list[tuple[str, int]] = []
    above: tuple[str, int] | None = None  # the deepest limit so far: (what, depth)
    for c in cascade:
        if c.name in wanted:
            depth = _check_int(f"cascade.{c.name}", wanted[c.name], 0, c.max_top_m, f"cascade stage {c.name}'s max_top_m")
            if depth > pool:
                raise FunnelError(f"cascade.{c.name}={depth} exceeds the candidate pool ({pool})")
            if above is not None and depth > above[1]:
                raise FunnelError(f"cascade.{c.name}={depth} exceeds {above[0]}={above[1]}: a stage reranks at most what the stage before it kept")
        else:
            depth = min(c.default_top_m, pool, above[1] if above is not None else pool)
        out.append((c.name, depth))
        if depth > 0:
            above = (f"cascade.{c.name}", depth)
    if above is not None and rerank_top_m > above[1]:
        if request.rerank_top_m is not None:
            raise FunnelError(f"rerank_top_m={rerank_top_m} exceeds {above[0]}={above[1]}: the reranker reads at most what the cascade kept")
        rerank_top_m = above[1]
    return tuple(out), rerank_top_m

