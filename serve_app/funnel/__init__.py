"""The search funnel, written once: retrieve -> fuse -> select -> rerank -> blend -> assemble.

:class:`Funnel` runs the funnel over a set of stage adapters (:class:`FunnelStages`) and owns
every decision about a stage that fails, times out or is overloaded. Two thin callers give it
their adapters: :class:`serve_app.pipeline.SearchPipeline` (the retrievers and the reranker as
objects in this process) and the Serve ingress (``serve_app.serve.service``, the stages behind
deployment handles). Nothing here imports Ray or knows about HTTP: outcomes are values
(:class:`SearchResult` with per-stage :class:`StageReport`) or core exceptions
(``serve_app.errors``), which only ``serve_app.serve.http`` maps to status codes.

Steps:

1. :func:`resolve_funnel` applies defaults and validates sizes against :class:`FunnelLimits`
   (``FunnelError``);
2. each requested retriever returns its top ``top_k`` documents, all retrievers concurrently;
3. their lists are fused (RRF or weighted fusion, ``FusionConfig``) and candidates missing from
   the document store are dropped;
4. each cascade stage, if any (``CascadeStage``: cheaper rerankers first), scores the first
   ``cascade[name]`` candidates of the order it receives and reorders them; then the first
   ``rerank_top_m`` candidates of that order are scored by the (final) reranker;
5. :func:`apply_rerank` orders those by score (or blends it with their rank in the order the
   reranker received: the fused rank without a cascade);
6. :func:`assemble` keeps ``top_n`` results with documents, timings and stage reports.

Decisions (the same for one query and for a batch):

* a retriever that raises, times out (``FunnelTimeouts.retriever_s``) or answers something
  unusable (a wrong number of lists, a non-finite score) is left out: the answer is *degraded*,
  its report says why; if every requested retriever is left out, :class:`StageTimeout` (all
  timed out) or :class:`StageUnavailable` is raised;
* a reranker that raises, times out (``rerank_s``) or answers unusable scores leaves the fused
  order in place, flagged degraded;
* a stage whose queue is full (:class:`StageOverloaded`) sheds the whole request: the other
  stage calls are cancelled and the exception propagates; so does a stage that finds the
  request's own input unusable (:class:`~serve_app.errors.InputRejected`: an unknown model, a
  document too long to read whole with ``truncate=False``);
* past ``request_s`` the request's pending calls are cancelled and :class:`DeadlineExceeded`
  is raised.

Cascades. A stage orders its candidates by its scores, or (``blend: rrf``) by the RRF blend of
its rank and the rank it received, as ``FusionConfig.rerank_blend`` does for the reranker. A
stage's depth comes from the request (``cascade: {name: depth}``, at most the
stage's ``max_top_m``) or its ``default_top_m``; depths never grow along the cascade (an explicit
depth above the previous stage's is an error, a default is lowered to it), and neither does the
final ``rerank_top_m``. A cascade stage that fails or times out leaves the order it received in
place and is flagged degraded (``rerank.<name>`` in the reports); the next stage and the final
reranker still run. The request's ``instruction`` goes to the final reranker only.

SLO-aware depth. With a depth controller (``serve_app.slo.DepthController``), a single request's
final ``rerank_top_m`` may be lowered, before the call, to what the latency objective allows
given the candidates already in flight to the reranker; the answer's ``funnel.rerank_top_m`` is
the depth used and ``stages.rerank`` says ``depth_reduced`` with the ``requested_top_m``.

Sizes. ``top_k`` is per retriever, so the fused pool has at most ``top_k * len(retrievers)``
documents. An explicit ``rerank_top_m`` or ``top_n`` larger than that pool is an error; a
*default* larger than the pool is lowered to the pool size. ``rerank_top_m = 0`` disables
reranking (as does a funnel without a reranker, where an explicit ``rerank_top_m > 0`` is an
error). When ``top_n > rerank_top_m > 0`` the results are the reranked ``rerank_top_m``
candidates in rerank order, followed by the remaining fused candidates in fused order (their
``rerank_score`` is None); a result's ``score`` is its rerank score when it was reranked (its
blended score under ``FusionConfig.rerank_blend = "rrf"``), its fused score otherwise.

Modules: :mod:`~serve_app.funnel.request` (resolution and validation of a request's sizes),
:mod:`~serve_app.funnel.results` (stage reports, ranked candidates, assembly, stage names),
:mod:`~serve_app.funnel.stages` (the :class:`FunnelStages` protocol, timeouts, deadlines, checks
of a stage's answer) and :mod:`~serve_app.funnel.run` (:class:`Funnel` itself). Everything is
importable from ``serve_app.funnel``.
"""

from serve_app.funnel.request import (
    KNOWN_RETRIEVERS,
    CascadeDepths,
    FunnelRequest,
    ModelResolver,
    ResolvedFunnel,
    resolve_funnel,
    single_model,
)
from serve_app.funnel.results import (
    DEFAULT_MODEL,
    FUSION,
    RERANK,
    SKIPPED,
    CascadeNames,
    RankedCandidate,
    SearchResult,
    SearchResultItem,
    StageReport,
    apply_rerank,
    assemble,
    order_by_scores,
    stage_key,
)
from serve_app.funnel.run import Funnel
from serve_app.funnel.stages import (
    FunnelStages,
    FunnelTimeouts,
    describe_exception,
    gather_all,
    input_rejected,
    run_with_deadline,
)

__all__ = [
    "DEFAULT_MODEL",
    "FUSION",
    "KNOWN_RETRIEVERS",
    "RERANK",
    "SKIPPED",
    "CascadeDepths",
    "CascadeNames",
    "Funnel",
    "FunnelRequest",
    "FunnelStages",
    "FunnelTimeouts",
    "ModelResolver",
    "RankedCandidate",
    "ResolvedFunnel",
    "SearchResult",
    "SearchResultItem",
    "StageReport",
    "apply_rerank",
    "assemble",
    "describe_exception",
    "gather_all",
    "input_rejected",
    "order_by_scores",
    "resolve_funnel",
    "run_with_deadline",
    "single_model",
    "stage_key",
]
