"""Exception hierarchy: errors caused by the user's input or setup, with messages fit to show them."""

from __future__ import annotations


class UserFacingError(Exception):
    """Base of errors whose message alone tells the user what to fix (CLI prints it without a traceback)."""


class CorpusError(UserFacingError, ValueError):
    """A corpus, query or qrels file is malformed; the message names the file and line."""


class IndexLoadError(UserFacingError):
    """An index directory is missing, incomplete, corrupted or built with other settings."""


class FunnelError(UserFacingError, ValueError):
    """Funnel sizes (top_k, rerank_top_m, top_n) or retriever names out of the configured limits."""
