"""First-stage retrievers: BM25 (``bm25``) and bi-encoder + FAISS (``dense``, in ``serve_app.retrieval.dense``).

Both implement the ``serve_app.types.Retriever`` protocol and answer with documents.
The dense module is imported on demand (it pulls in torch and FAISS).
"""

from serve_app.retrieval.bm25 import BM25Retriever

__all__ = ["BM25Retriever"]
