"""Exception hierarchy of the core: what went wrong, never how to answer it over HTTP.

Two families:

* :class:`UserFacingError`: the user's input or setup is wrong (a malformed corpus, an index that
  does not load, funnel sizes out of their limits); the message alone says what to fix, and the
  CLI prints it without a traceback.
* :class:`StageError`: a stage of the funnel could not give the answer a request needs (every
  retriever failed, the reranker timed out, a queue is full, the request's deadline passed). The
  funnel (``serve_app.funnel``) raises these; only the HTTP edge (``serve_app.serve.http``) maps
  them, once, to status codes and the error envelope.

:class:`InputRejected` (a user-facing error) is what a stage raises when the request itself is
at fault (an unknown model, an input too long to read whole): the funnel passes it on as it is.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional


class UserFacingError(Exception):
    """Base of errors whose message alone tells the user what to fix (CLI prints it without a traceback)."""


class CorpusError(UserFacingError, ValueError):
    """A corpus, query or qrels file is malformed; the message names the file and line."""


class IndexLoadError(UserFacingError):
    """An index directory is missing, incomplete, corrupted or built with other settings."""


class FunnelError(UserFacingError, ValueError):
    """Funnel sizes (top_k, rerank_top_m, top_n) or retriever names out of the configured limits."""


# --------------------------------------------------------------------------- stage outcomes


class StageError(RuntimeError):
    """A funnel stage could not give what the request needs; ``stage`` names it.

    ``stages`` holds the per-stage reports of the request when there are some (what each stage
    did before the request failed), for logs and metrics.
    """

    def __init__(self, stage: str, message: str, stages: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.message = message
        self.stages = dict(stages or {})


class StageTimeout(StageError):
    """A stage needed for the answer did not answer within its timeout (every retriever, or the
    reranker of a rerank-only request)."""


class StageUnavailable(StageError):
    """A stage needed for the answer failed: every requested retriever, or the reranker of a
    rerank-only request."""


class StageOutputError(StageError):
    """A stage answered something unusable (wrong number of scores, a non-finite score): a bug
    or a broken model, not the client's fault."""


class StageOverloaded(StageError):
    """A stage rejected the call because its request queue is full (back-pressure): the request
    is shed, not degraded, so that clients back off."""

    #: Seconds a client is told to wait when the stage did not say.
    DEFAULT_RETRY_AFTER_S = 1.0

    def __init__(self, stage: str, retry_after_s: Optional[float] = None) -> None:
        super().__init__(stage, f"the {stage} stage is at capacity (its request queue is full)")
        self.retry_after_s = self.DEFAULT_RETRY_AFTER_S if retry_after_s is None else float(retry_after_s)

    def retry_after_header(self) -> str:
        """``Retry-After`` value: whole seconds, rounded up, at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


class DeadlineExceeded(StageError):
    """The request's overall deadline passed before its answer was ready; its pending stage
    calls were cancelled."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__("request", f"no answer within request_timeout_s={timeout_s:g}")
        self.timeout_s = timeout_s


# --------------------------------------------------------------------------- the client's input, found out by a stage


class InputRejected(UserFacingError):
    """A stage found the request's input unusable (the client's mistake, not the stage's): it is
    answered as such, never degraded."""


class Forbidden(InputRejected):
    """The request's API key may not do this: an operation outside its scope, or a write that
    would touch a document outside the key's bound filter. Answered 403 (``forbidden``)."""


class ModelNotFound(InputRejected, LookupError):
    """The request names a model (reranker) that is not configured; ``available`` lists those that are."""

    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(f"model {name!r} is not served here; available models: {', '.join(available)}")
        self.name = name
        self.available = list(available)


class InputTooLong(InputRejected):
    """With truncation turned off, a query and document pair exceeds the tokens the model reads."""
