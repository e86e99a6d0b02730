"""The corpus (documents in index order, addressable by id) and the readers of BEIR-style files.

Corpus files are JSON Lines, plain or gzip-compressed (``.jsonl`` / ``.jsonl.gz``), in one of
two formats, detected per file from its first record:

* plain: ``{"id": ..., "text": ..., "title": ... (optional), "metadata": {...} (optional)}``
* BEIR:  ``{"_id": ..., "title": ..., "text": ..., "metadata": {...} (optional)}``

Every line of a file must use the format of its first record. ``id``/``_id``, ``text`` and
``title`` (when present) must be strings, ``metadata`` (when present and not null) a JSON
object; other keys are ignored. Blank lines are ignored. An id seen on an earlier line is an
error.

**Empty documents** (title and text together empty or whitespace only; BEIR-style collections
such as Cranfield hold a few) are valid records with nothing to retrieve: they are left out of
the corpus, counted and named in one warning (:attr:`CorpusLoadResult.empty`), never an error.

By default (``on_error="raise"``) the first bad line raises :class:`CorpusError` naming the
file and line number. With ``on_error="skip"`` bad lines are left out instead (for a duplicate
id, the later line is the one left out): :func:`load_corpus` logs a warning with the number of
skipped lines and the first reasons, and :func:`read_corpus` also returns every skipped line
with its reason.

A corpus *source* (:func:`read_corpus_source`) is a corpus file, a BEIR dataset directory (its
``corpus.jsonl[.gz]``) or ``builtin:demo``, the demo dataset shipped with the package.

Queries are JSON Lines (``_id`` or ``id``, and ``text``); qrels are BEIR TSV files with the
header ``query-id corpus-id score``. :func:`load_beir` reads a BEIR dataset directory.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Optional, Sequence, overload

from serve_app.demo import DEMO_DIR, demo_qrels_path
from serve_app.errors import CorpusError
from serve_app.types import Document

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]

__all__ = [
    "BeirDataset",
    "Corpus",
    "CorpusLoadResult",
    "SkippedLine",
    "load_beir",
    "load_corpus",
    "load_qrels",
    "load_queries",
    "read_corpus",
    "iter_corpus",
    "read_corpus_source",
    "corpus_path",
    "write_documents_jsonl",
]

#: ``builtin:demo`` names the demo dataset shipped with the package (serve_app.demo).
BUILTIN_PREFIX = "builtin:"


class Corpus(Sequence[Document]):
    """Documents in index order; position ``i`` is the document's row in every index."""

    __slots__ = ("_docs", "_pos")

    def __init__(self, docs: Iterable[Document] = ()) -> None:
        self._docs: tuple[Document, ...] = tuple(docs)
        self._pos: dict[str, int] = {}
        for i, d in enumerate(self._docs):
            if not isinstance(d, Document):
                raise TypeError(f"corpus entry {i} is a {type(d).__name__}, not a Document")
            if d.id in self._pos:
                raise CorpusError(f"duplicate document id {d.id!r} at positions {self._pos[d.id]} and {i}")
            self._pos[d.id] = i

    @classmethod
    def from_documents(cls, docs: Iterable[Document]) -> "Corpus":
        """A corpus of ``docs`` in the given order; raises :class:`CorpusError` on a duplicate id."""
        return cls(docs)

    def __len__(self) -> int:
        return len(self._docs)

    @overload
    def __getitem__(self, i: int) -> Document: ...

    @overload
    def __getitem__(self, i: slice) -> "Corpus": ...

    def __getitem__(self, i: int | slice) -> "Document | Corpus":
        if isinstance(i, slice):
            return Corpus(self._docs[i])
        return self._docs[i]

    def __iter__(self) -> Iterator[Document]:
        return iter(self._docs)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return item in self._pos
        return isinstance(item, Document) and self._pos.get(item.id) is not None and self._docs[self._pos[item.id]] == item

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Corpus) and self._docs == other._docs

    def __repr__(self) -> str:
        return f"Corpus({len(self)} documents)"

    @property
    def ids(self) -> list[str]:
        """Document ids in index order."""
        return [d.id for d in self._docs]

    def get(self, doc_id: str) -> Document | None:
        """The document with id ``doc_id``, or None."""
        i = self._pos.get(doc_id)
        return None if i is None else self._docs[i]

    def get_many(self, doc_ids: Sequence[str]) -> list[Document | None]:
        """The documents of ``doc_ids`` in that order (None for an unknown id)."""
        return [self.get(d) for d in doc_ids]

    def positions(self, doc_ids: Sequence[str]) -> dict[str, int]:
        """Index positions of those of ``doc_ids`` the corpus holds."""
        return {d: self._pos[d] for d in doc_ids if d in self._pos}

    def position(self, doc_id: str) -> int:
        """Index position of ``doc_id``; raises ``KeyError`` for an unknown id."""
        try:
            return self._pos[doc_id]
        except KeyError:
            raise KeyError(f"unknown document id {doc_id!r}") from None


# --------------------------------------------------------------------------- reading lines


def _open_binary(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _check_suffix(path: Path, allowed: tuple[str, ...], what: str) -> None:
    if not any(path.name.endswith(s) for s in allowed):
        raise CorpusError(f"{path}: unsupported {what} file name; expected one of {', '.join(allowed)}")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) pairs; unreadable files raise CorpusError."""
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, start=1):
                yield lineno, raw
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise CorpusError(f"{path}: line {lineno + 1}: cannot read file ({type(exc).__name__}: {exc})") from exc


def _decode(path: Path, lineno: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: line {lineno}: not valid UTF-8 (byte {exc.start})") from None


def _parse_json_object(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path}: line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise CorpusError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _string_field(path: Path, lineno: int, obj: Mapping[str, Any], key: str, *, required: bool) -> str:
    if key not in obj:
        if required:
            raise CorpusError(f"{path}: line {lineno}: missing field {key!r}")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise CorpusError(f"{path}: line {lineno}: field {key!r} must be a string, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True, slots=True)
class SkippedLine:
    """A corpus line left out by ``on_error="skip"``."""

    line: int
    reason: str


@dataclass(frozen=True)
class CorpusLoadResult:
    """What :func:`read_corpus` read: the corpus, the bad lines it skipped (none with
    ``on_error="raise"``) and the ids of the empty documents it left out."""

    corpus: Corpus
    skipped: list[SkippedLine] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)


def _detect_id_key(path: Path, lineno: int, obj: Mapping[str, Any]) -> str:
    if "_id" in obj:
        return "_id"
    if "id" in obj:
        return "id"
    raise CorpusError(f"{path}: line {lineno}: missing document id: expected '_id' (BEIR) or 'id' (plain JSONL)")


def _parse_document(path: Path, lineno: int, obj: Mapping[str, Any], id_key: str, fmt_line: int) -> Document:
    """The record's document (its content may be empty: the caller leaves such documents out)."""
    if id_key not in obj:
        other = "id" if id_key == "_id" else "_id"
        hint = f" (the file uses {id_key!r}, detected from line {fmt_line}" + (f"; this line has {other!r})" if other in obj else ")")
        raise CorpusError(f"{path}: line {lineno}: missing field {id_key!r}{hint}")
    doc_id = _string_field(path, lineno, obj, id_key, required=True)
    if not doc_id:
        raise CorpusError(f"{path}: line {lineno}: empty document id")
    text = _string_field(path, lineno, obj, "text", required=True)
    title = _string_field(path, lineno, obj, "title", required=False)
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise CorpusError(f"{path}: line {lineno}: field 'metadata' must be a JSON object, got {type(metadata).__name__}")
    return Document(id=doc_id, text=text, title=title, metadata=metadata)


def iter_corpus(
    path: str | os.PathLike[str],
    *,
    on_error: OnError = "raise",
    skipped: Optional[list[SkippedLine]] = None,
    empty: Optional[list[str]] = None,
    first_line: Optional[dict[str, int]] = None,
) -> Iterator[Document]:
    """The documents of a corpus file one at a time, validated as :func:`read_corpus` validates
    them, without holding the corpus: bad lines go to ``skipped`` (``on_error="skip"``), the ids
    of empty documents to ``empty``. Repeated ids are refused only with ``first_line`` (a dict it
    fills: id -> line), which grows with the corpus; a streaming consumer that refuses them
    itself (the document store's unique ids) passes none."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    p = Path(path)
    _check_suffix(p, (".jsonl", ".jsonl.gz"), "corpus")
    id_key: str | None = None
    fmt_line = 0
    for lineno, raw in _lines(p):
        try:
            line = _decode(p, lineno, raw)
            if not line.strip():
                continue
            obj = _parse_json_object(p, lineno, line)
            if id_key is None:
                id_key, fmt_line = _detect_id_key(p, lineno, obj), lineno
            doc = _parse_document(p, lineno, obj, id_key, fmt_line)
            if first_line is not None and doc.id in first_line:
                raise CorpusError(f"{p}: line {lineno}: duplicate document id {doc.id!r} (first seen on line {first_line[doc.id]})")
        except CorpusError as exc:
            if on_error == "raise":
                raise
            if skipped is not None:
                skipped.append(SkippedLine(lineno, str(exc)))
            continue
        if first_line is not None:
            first_line[doc.id] = lineno
        if not doc.content.strip():
            if empty is not None:
                empty.append(doc.id)
            continue
        yield doc


def no_documents(path: str | os.PathLike[str], skipped: Sequence[SkippedLine], empty: Sequence[str]) -> CorpusError:
    """The error of a corpus file that yielded no document, saying what was left out."""
    left = [f"{len(skipped)} bad lines skipped"] if skipped else []
    left += [f"{len(empty)} empty documents left out"] if empty else []
    return CorpusError(f"{Path(path)}: no documents" + (f" ({', '.join(left)})" if left else ""))


def read_corpus(path: str | os.PathLike[str], *, on_error: OnError = "raise") -> CorpusLoadResult:
    """Read a corpus file (see the module docstring) and report the lines skipped."""
    skipped: list[SkippedLine] = []
    empty: list[str] = []
    docs = list(iter_corpus(path, on_error=on_error, skipped=skipped, empty=empty, first_line={}))
    if not docs:
        raise no_documents(path, skipped, empty)
    return CorpusLoadResult(Corpus(docs), skipped, empty)


def log_load_result(path: str | os.PathLike[str], result: CorpusLoadResult) -> None:
    """One warning for the bad lines skipped and one for the empty documents left out."""
    if result.skipped:
        shown = "; ".join(s.reason for s in result.skipped[:5])
        more = f" (and {len(result.skipped) - 5} more)" if len(result.skipped) > 5 else ""
        logger.warning("%s: skipped %d bad line(s): %s%s", path, len(result.skipped), shown, more)
    if result.empty:
        more = f" (and {len(result.empty) - 5} more)" if len(result.empty) > 5 else ""
        logger.warning("%s: left out %d empty document(s) (no title and no text): %s%s", path, len(result.empty), ", ".join(map(repr, result.empty[:5])), more)


def load_corpus(path: str | os.PathLike[str], *, on_error: OnError = "raise") -> Corpus:
    """Read a corpus file; skipped bad lines (``on_error="skip"``) and left-out empty documents
    are logged as warnings."""
    result = read_corpus(path, on_error=on_error)
    log_load_result(path, result)
    return result.corpus


def corpus_path(source: str | os.PathLike[str]) -> Path:
    """The corpus file of a source: the file itself, ``corpus.jsonl[.gz]`` inside a BEIR dataset
    directory, or the demo dataset's for ``builtin:demo``."""
    text = str(source)
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX) :]
        if name != "demo":
            raise CorpusError(f"corpus: unknown built-in corpus {name!r} (available: builtin:demo)")
        return _find(Path(DEMO_DIR), "corpus")
    p = Path(source).expanduser()
    if p.is_dir():
        for name in ("corpus.jsonl", "corpus.jsonl.gz"):
            if (p / name).is_file():
                return p / name
        raise CorpusError(f"{p}: a directory without corpus.jsonl or corpus.jsonl.gz (not a BEIR dataset directory)")
    if not p.exists():
        raise CorpusError(f"{p}: no such corpus file or directory")
    return p


def read_corpus_source(source: str | os.PathLike[str], *, on_error: OnError = "raise") -> CorpusLoadResult:
    """Read the corpus of a source (see :func:`corpus_path`), logging what was left out."""
    path = corpus_path(source)
    result = read_corpus(path, on_error=on_error)
    log_load_result(path, result)
    return result


def write_documents_jsonl(corpus: Iterable[Document], path: str | os.PathLike[str]) -> None:
    """Write documents as plain JSONL (id, title, text, metadata), readable by :func:`load_corpus`.

    The file is flushed and fsync'ed before returning. Metadata must be JSON-serialisable.
    """
    p = Path(path)
    with open(p, "w", encoding="utf-8", newline="\n") as f:
        for d in corpus:
            record = {"id": d.id, "title": d.title, "text": d.text, "metadata": dict(d.metadata)}
            try:
                line = json.dumps(record, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise CorpusError(f"document {d.id!r}: metadata is not JSON-serialisable ({exc})") from exc
            f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- queries and qrels


def load_queries(path: str | os.PathLike[str]) -> dict[str, str]:
    """Queries of a JSONL file (``_id`` or ``id``, and ``text``) as ``{query id: text}`` in file order."""
    p = Path(path)
    _check_suffix(p, (".jsonl", ".jsonl.gz"), "queries")
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    id_key: str | None = None
    for lineno, raw in _lines(p):
        line = _decode(p, lineno, raw)
        if not line.strip():
            continue
        obj = _parse_json_object(p, lineno, line)
        if id_key is None:
            id_key = "_id" if "_id" in obj else "id"
        qid = _string_field(p, lineno, obj, id_key, required=True)
        if not qid:
            raise CorpusError(f"{p}: line {lineno}: empty query id")
        text = _string_field(p, lineno, obj, "text", required=True)
        if not text.strip():
            raise CorpusError(f"{p}: line {lineno}: query {qid!r} has empty text")
        if qid in queries:
            raise CorpusError(f"{p}: line {lineno}: duplicate query id {qid!r} (first seen on line {first_line[qid]})")
        queries[qid] = text
        first_line[qid] = lineno
    return queries


QRELS_HEADER = ("query-id", "corpus-id", "score")


def load_qrels(path: str | os.PathLike[str]) -> dict[str, dict[str, int]]:
    """Relevance judgements of a BEIR TSV file (header ``query-id corpus-id score``).

    Returns ``{query id: {document id: integer score}}``. A pair judged twice with the same
    score is accepted; with different scores it is an error.
    """
    p = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    seen_on: dict[tuple[str, str], int] = {}
    header_seen = False
    for lineno, raw in _lines(p):
        line = _decode(p, lineno, raw).rstrip("\r\n")
        if not line.strip():
            continue
        cols = line.split("\t")
        if not header_seen:
            if tuple(c.strip() for c in cols) != QRELS_HEADER:
                raise CorpusError(f"{p}: line {lineno}: expected the header {chr(9).join(QRELS_HEADER)!r} (tab-separated), got {line!r}")
            header_seen = True
            continue
        if len(cols) != 3:
            raise CorpusError(f"{p}: line {lineno}: expected 3 tab-separated columns (query-id, corpus-id, score), got {len(cols)}")
        qid, did, score_s = (c.strip() for c in cols)
        if not qid or not did:
            raise CorpusError(f"{p}: line {lineno}: empty query-id or corpus-id")
        try:
            score = int(score_s)
        except ValueError:
            raise CorpusError(f"{p}: line {lineno}: score {score_s!r} is not an integer") from None
        prev = qrels.setdefault(qid, {}).get(did)
        if prev is not None and prev != score:
            raise CorpusError(f"{p}: line {lineno}: ({qid!r}, {did!r}) judged {score} here and {prev} on line {seen_on[(qid, did)]}")
        qrels[qid][did] = score
        seen_on.setdefault((qid, did), lineno)
    if not header_seen:
        raise CorpusError(f"{p}: empty qrels file (expected the header {' '.join(QRELS_HEADER)!r})")
    return qrels


# --------------------------------------------------------------------------- BEIR datasets


@dataclass(frozen=True)
class BeirDataset:
    """A BEIR dataset split: the corpus, the queries judged in the split, and its qrels.

    ``skipped`` and ``empty_documents`` say what the corpus lost (see :class:`CorpusLoadResult`).
    """

    corpus: Corpus
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    skipped: list[SkippedLine] = field(default_factory=list)
    empty_documents: list[str] = field(default_factory=list)


def _find(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (directory / name).is_file():
            return directory / name
    raise CorpusError(f"{directory}: neither {stem}.jsonl nor {stem}.jsonl.gz found (not a BEIR dataset directory?)")


def load_beir(dataset_dir: str | os.PathLike[str], split: str = "test", *, on_error: OnError = "raise") -> BeirDataset:
    """Read a BEIR dataset directory (``corpus.jsonl[.gz]``, ``queries.jsonl[.gz]``, ``qrels/<split>.tsv``).

    Only the queries with judgements in the split are kept. Qrels naming a query absent from the
    queries file raise :class:`CorpusError`; judged documents absent from the corpus (empty
    ones included) are logged. ``on_error`` applies to the corpus lines (see :func:`read_corpus`).
    """
    d = Path(dataset_dir)
    if not d.is_dir():
        raise CorpusError(f"{d}: no such dataset directory")
    qrels_path = d / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        available = sorted(p.stem for p in (d / "qrels").glob("*.tsv")) if (d / "qrels").is_dir() else []
        raise CorpusError(f"{qrels_path}: no such qrels file (available splits: {', '.join(available) or 'none'})")
    loaded = read_corpus(_find(d, "corpus"), on_error=on_error)
    log_load_result(_find(d, "corpus"), loaded)
    corpus = loaded.corpus
    all_queries = load_queries(_find(d, "queries"))
    qrels = load_qrels(qrels_path)
    missing = [q for q in qrels if q not in all_queries]
    if missing:
        raise CorpusError(f"{qrels_path}: {len(missing)} judged query id(s) not in the queries file, e.g. {missing[:3]}")
    unknown_docs = {did for judged in qrels.values() for did in judged if corpus.get(did) is None}
    if unknown_docs:
        logger.warning("%s: %d judged document id(s) not in the corpus, e.g. %s", qrels_path, len(unknown_docs), sorted(unknown_docs)[:3])
    queries = {q: t for q, t in all_queries.items() if q in qrels}
    return BeirDataset(corpus=corpus, queries=queries, qrels=qrels, skipped=loaded.skipped, empty_documents=loaded.empty)


def load_demo(split: str = "test") -> BeirDataset:
    """The demo dataset (:mod:`serve_app.demo`) with the queries and qrels of ``split``."""
    demo_qrels_path(split)  # validates the split name
    return load_beir(DEMO_DIR, split)
