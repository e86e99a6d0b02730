"""Reranking: the model families (cross-encoder, pooling, decoder LLM), their runtimes,
token-budgeted batching, the pair-score cache, and the document reranker."""

from serve_app.rerank.cache import ScoreCache
from serve_app.rerank.cross_encoder import CrossEncoderScorer
from serve_app.rerank.loading import load_scorer
from serve_app.rerank.reranker import Reranker, RerankRequest
from serve_app.rerank.scorer import PairScorer, ScoreStats

__all__ = ["CrossEncoderScorer", "PairScorer", "Reranker", "RerankRequest", "ScoreCache", "ScoreStats", "load_scorer"]
