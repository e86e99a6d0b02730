"""Cross-encoder reranking: token-budgeted batching, the scorer, and the document reranker."""

from serve_app.rerank.cross_encoder import CrossEncoderScorer, ScoreStats
from serve_app.rerank.reranker import Reranker, RerankRequest

__all__ = ["CrossEncoderScorer", "Reranker", "RerankRequest", "ScoreStats"]
