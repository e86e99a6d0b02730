"""PairScorer: what every reranker model family shares.

A scorer turns (query, document) pairs into one float32 relevance score per pair, in input
order. The families differ only in two pieces, which a subclass supplies:

* an **encoder** (``self.pairs``): pairs -> unpadded token ids, the document cut to fit the
  pair limit (:class:`~serve_app.rerank.pairs.PairTokenizer` for encoder models,
  :class:`~serve_app.rerank.causal_lm.PromptTokenizer` for decoder rerankers), and a ``pad``
  that makes one batch of tensors;
* a **score module** (``self.module``): a ``torch.nn.Module`` mapping a padded batch to one
  raw score per row (a logit, a logit difference, a pooled projection). The same module runs
  in torch, is exported to ONNX, and is what the drift check compares.

The rest is here, once: token-budget batch planning (``plan_batches``, length-sorted), the
runtime that executes the batches (torch, ONNX Runtime or OpenVINO, see
:mod:`serve_app.rerank.runtimes`), the activation, counters and per-call stats.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from serve_app.config import RerankerModelConfig
from serve_app.rerank.batching import plan_batches

#: A runtime: one padded batch (torch tensors by input name) -> raw scores, float32 numpy.
Runtime = Callable[[dict[str, Any]], np.ndarray]


@dataclass(frozen=True)
class ScoreStats:
    """What one ``score`` call did: pairs, forward passes, their sizes and their padding."""

    pairs: int = 0
    batches: int = 0
    batch_sizes: tuple[int, ...] = ()
    tokens: int = 0
    padded_tokens: int = 0


@dataclass
class _Counters:
    pairs_scored: int = 0
    batches_run: int = 0
    tokens_scored: int = 0
    padded_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class PairScorer:
    """Base of the reranker model families (see the module docstring).

    Subclasses build the encoder and the score module and call :meth:`_setup` (torch, as
    loaded); :func:`serve_app.rerank.loading.load_scorer` then asks for the scorer on the
    configured runtime with :meth:`on_runtime`.
    """

    #: The family's ``reranker.kind``.
    kind: str = ""
    #: Whether a request may send its own instruction (decoder rerankers).
    accepts_instruction: bool = False

    def _setup(self, cfg: RerankerModelConfig, tokenizer: Any, pairs: Any, module: Any, device: str, dtype: Any) -> None:
        from serve_app.rerank.runtimes import TorchRuntime

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.pairs = pairs
        self.module = module
        self.device = device
        self.dtype = dtype
        self.max_length: int = pairs.max_length
        self.min_pair_length: int = pairs.min_pair_length
        self.runtime: Runtime = TorchRuntime(module, device)
        #: What runs the batches, and how far it drifts from torch float32 (set by load_scorer).
        self.runtime_info: dict[str, Any] = {"backend": "torch", "dtype": str(dtype).replace("torch.", ""), "quantize": "none", "device": device, "drift": None}
        self._counters = _Counters()
        self.last_stats = ScoreStats()

    def on_runtime(self, module: Any, runtime: Runtime, dtype: Any, info: dict[str, Any]) -> "PairScorer":
        """A new scorer of the same model and encoder whose batches run on ``runtime`` (``module``:
        the torch score module it runs, None when an export runs them), ``info`` its runtime
        description; it starts with fresh counters."""
        import copy

        other = copy.copy(self)
        other.module = module
        other.dtype = dtype
        other.runtime = runtime
        other.runtime_info = dict(info)
        other._counters = _Counters()
        other.last_stats = ScoreStats()
        return other

    # ------------------------------------------------------------------ info
    @property
    def model_name(self) -> str:
        """The configured model name (Hub id or directory)."""
        return self.cfg.model

    @property
    def pairs_scored(self) -> int:
        """Pairs scored since the scorer was built."""
        return self._counters.pairs_scored

    @property
    def batches_run(self) -> int:
        """Forward passes run since the scorer was built."""
        return self._counters.batches_run

    @property
    def tokens_scored(self) -> int:
        """Real (non-padding) tokens fed to the model since the scorer was built."""
        return self._counters.tokens_scored

    @property
    def padded_tokens(self) -> int:
        """Padding tokens added to batches since the scorer was built."""
        return self._counters.padded_tokens

    def describe(self) -> dict[str, Any]:
        """The model's family, runtime and drift figures (what ``/info`` shows)."""
        return {"model": self.model_name, "kind": self.kind, "max_length": self.max_length, "activation": self.cfg.activation, **self.runtime_info}

    def query_overhead(self, query: str, instruction: Optional[str] = None) -> int:
        """Tokens a pair spends on everything but the document."""
        return self.pairs.query_overhead(query, instruction) if self.accepts_instruction else self.pairs.query_overhead(query)

    def _features(self, pairs: Sequence[tuple[str, str]], limits: list[int], instructions: Optional[Sequence[Optional[str]]]) -> list[dict[str, list[int]]]:
        if instructions is not None and any(i is not None for i in instructions):
            if not self.accepts_instruction:
                raise ValueError(f"an instruction applies only to decoder rerankers (kind causal_lm); {self.model_name!r} is {self.kind}")
            if len(instructions) != len(pairs):
                raise ValueError(f"instructions has {len(instructions)} values for {len(pairs)} pairs")
            return self.pairs.features(pairs, limits, instructions)
        return self.pairs.features(pairs, limits)

    # --------------------------------------------------------------- scoring
    def score(self, pairs: Sequence[tuple[str, str]], max_length: int | Sequence[int] | None = None, instructions: Optional[Sequence[Optional[str]]] = None) -> np.ndarray:
        """One relevance score per (query, document) pair, float32, in input order.

        ``max_length`` lowers the token limit of the pairs for this call only: one int for
        every pair or one per pair (values above the configured limit are capped to it).
        ``instructions`` (decoder rerankers): one per pair, None for the configured one.
        """
        return self.score_with_lengths(pairs, max_length, instructions)[0]

    def score_with_lengths(
        self, pairs: Sequence[tuple[str, str]], max_length: int | Sequence[int] | None = None, instructions: Optional[Sequence[Optional[str]]] = None, *, record: bool = True, wanted: Optional[Callable[[int], bool]] = None
    ) -> tuple[np.ndarray, list[int]]:
        """:meth:`score`, and the number of tokens the model read for each pair. ``record=False``
        leaves the counters and ``last_stats`` alone (a probe is not traffic). ``wanted(i)``,
        asked before each forward pass for the pairs in it: False drops pair ``i`` unscored (its
        request was cancelled meanwhile); its score is NaN and it read 0 tokens."""
        limits = self.pairs.limits(len(pairs), max_length)
        out = np.empty(len(pairs), dtype=np.float32)
        if not pairs:
            if record:
                self.last_stats = ScoreStats()
            return out, []
        features = self._features(pairs, limits, instructions)
        lengths = [len(f["input_ids"]) for f in features]
        batches = plan_batches(lengths, self.cfg.max_batch_tokens, self.cfg.max_batch_pairs)
        padded = 0
        run: list[list[int]] = []
        for batch in batches:
            if wanted is not None:
                dropped = [i for i in batch if not wanted(i)]
                if dropped:
                    out[dropped] = np.nan
                    for i in dropped:
                        lengths[i] = 0
                    gone = set(dropped)
                    batch = [i for i in batch if i not in gone]
                    if not batch:
                        continue
            out[batch] = self._forward([features[i] for i in batch])
            padded += max(lengths[i] for i in batch) * len(batch) - sum(lengths[i] for i in batch)
            run.append(batch)
        if not record:
            return out, lengths
        scored = sum(len(b) for b in run)
        stats = ScoreStats(scored, len(run), tuple(len(b) for b in run), sum(lengths), padded)
        with self._counters.lock:
            self._counters.pairs_scored += stats.pairs
            self._counters.batches_run += stats.batches
            self._counters.tokens_scored += stats.tokens
            self._counters.padded_tokens += stats.padded_tokens
        self.last_stats = stats
        return out, lengths

    def _forward(self, batch_features: list[dict[str, list[int]]]) -> np.ndarray:
        scores = np.asarray(self.runtime(self.pairs.pad(batch_features)), dtype=np.float32).reshape(-1)
        if self.cfg.activation == "sigmoid":
            scores = 0.5 * (1.0 + np.tanh(0.5 * scores.astype(np.float64)))  # the sigmoid, without overflow
        return scores.astype(np.float32, copy=False)
