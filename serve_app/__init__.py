"""serve_app: hybrid retrieval (BM25 + dense FAISS) and cross-encoder reranking on Ray Serve.

The core (corpus, retrievers, fusion, reranker, pipeline, evaluation) is plain Python
and never imports Ray; ``serve_app.serve`` wraps it into Ray Serve deployments.
"""

__version__ = "0.1.0"
