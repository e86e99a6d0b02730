"""Corpus container, JSONL/BEIR readers and the document store writer."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_app.corpus import (
    Corpus,
    load_beir,
    load_corpus,
    load_qrels,
    load_queries,
    read_corpus,
    write_documents_jsonl,
)
from serve_app.errors import CorpusError
from serve_app.types import Document


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    data = b"".join((l if isinstance(l, bytes) else l.encode("utf-8")) + b"\n" for l in lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def rec(**kw) -> str:
    return json.dumps(kw)


# --------------------------------------------------------------------------- Corpus


def test_corpus_sequence_and_lookup():
    docs = [Document("a", "alpha text"), Document("b", "beta text", title="B"), Document("c", "gamma")]
    corpus = Corpus.from_documents(docs)
    assert len(corpus) == 3
    assert list(corpus) == docs
    assert corpus[1] is docs[1] and corpus[-1] is docs[2]
    assert corpus.ids == ["a", "b", "c"]
    assert corpus.get("b") is docs[1] and corpus.get("zz") is None
    assert [corpus.position(i) for i in ("c", "a", "b")] == [2, 0, 1]
    assert "a" in corpus and "zz" not in corpus
    with pytest.raises(KeyError, match="zz"):
        corpus.position("zz")
    with pytest.raises(IndexError):
        corpus[3]


def test_corpus_rejects_duplicate_ids():
    with pytest.raises(CorpusError, match=r"duplicate document id 'a' at positions 0 and 2"):
        Corpus.from_documents([Document("a", "x"), Document("b", "y"), Document("a", "z")])


# --------------------------------------------------------------------------- load_corpus


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_load_plain_jsonl(tmp_path, suffix):
    path = write_lines(
        tmp_path / f"c{suffix}",
        [
            rec(id="d1", text="first text", title="First", metadata={"year": 2020}),
            "",
            rec(id="d2", text="second text"),
        ],
    )
    corpus = load_corpus(path)
    assert corpus.ids == ["d1", "d2"]
    assert corpus[0] == Document("d1", "first text", "First", {"year": 2020})
    assert corpus[0].content == "First first text"
    assert corpus[1].title == "" and corpus[1].metadata == {}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_load_beir_jsonl(tmp_path, suffix):
    path = write_lines(
        tmp_path / f"corpus{suffix}",
        [rec(_id="10", title="T", text="body", metadata={"url": "u"}), rec(_id="11", title="", text="other")],
    )
    corpus = load_corpus(path)
    assert corpus.ids == ["10", "11"]
    assert corpus.get("10") == Document("10", "body", "T", {"url": "u"})


def test_title_only_document_is_kept(tmp_path):
    corpus = load_corpus(write_lines(tmp_path / "c.jsonl", [rec(_id="1", title="Only a title", text="")]))
    assert (corpus[0].title, corpus[0].text) == ("Only a title", "")


BAD_LINES = [
    (rec(id="x", title="t"), r"missing field 'text'"),
    (rec(text="no id"), r"missing field 'id'"),
    (rec(id=7, text="int id"), r"field 'id' must be a string, got int"),
    (rec(id="x", text=["list"]), r"field 'text' must be a string"),
    (rec(id="x", text="t", title=3), r"field 'title' must be a string"),
    (rec(id="x", text="t", metadata=[1]), r"field 'metadata' must be a JSON object"),
    (rec(id="", text="t"), r"empty document id"),
    ('{"id": "x", "text": ', r"invalid JSON"),
    ("[1, 2]", r"expected a JSON object, got list"),
    (b'{"id": "x", "text": "caf\xe9"}', r"not valid UTF-8"),
    (rec(_id="x", text="BEIR line in a plain file"), r"missing field 'id'.*detected from line 1"),
]


@pytest.mark.parametrize("bad,message", BAD_LINES)
def test_bad_line_raises_with_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "c.jsonl", [rec(id="ok1", text="fine"), "", bad, rec(id="ok2", text="fine")])
    with pytest.raises(CorpusError, match=message) as err:
        load_corpus(path)
    assert str(path) in str(err.value) and "line 3" in str(err.value)


@pytest.mark.parametrize("bad,message", BAD_LINES)
def test_bad_line_skipped_with_reason(tmp_path, bad, message):
    path = write_lines(tmp_path / "c.jsonl", [rec(id="ok1", text="fine"), bad, rec(id="ok2", text="fine")])
    result = read_corpus(path, on_error="skip")
    assert result.corpus.ids == ["ok1", "ok2"]
    assert [s.line for s in result.skipped] == [2]
    assert re.search(message, result.skipped[0].reason)


def test_duplicate_id_names_both_lines(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [rec(id="a", text="one"), rec(id="b", text="two"), rec(id="a", text="three")])
    with pytest.raises(CorpusError, match=r"line 3: duplicate document id 'a' \(first seen on line 1\)"):
        load_corpus(path)
    result = read_corpus(path, on_error="skip")
    assert result.corpus.ids == ["a", "b"] and result.corpus[0].text == "one"
    assert [s.line for s in result.skipped] == [3]


def test_skip_logs_count(tmp_path, caplog):
    path = write_lines(tmp_path / "c.jsonl", [rec(id="a", text="x"), "oops", rec(id="b", title="t"), rec(id="c", text="y")])
    with caplog.at_level(logging.WARNING, logger="serve_app.corpus"):
        corpus = load_corpus(path, on_error="skip")
    assert corpus.ids == ["a", "c"]
    assert "skipped 2 bad line(s)" in caplog.text and "line 2" in caplog.text and "line 3" in caplog.text


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_empty_documents_are_left_out_counted_and_named(tmp_path, caplog, on_error):
    """BEIR-style collections (Cranfield) hold a few documents with no text: valid records with
    nothing to retrieve. They never stop a load; they are left out and reported."""
    rows = [rec(id="a", text="x"), rec(id="e1", text="", title=""), rec(id="b", text="y"), rec(id="e2", text="  \n ", title="\t"), rec(id="c", title="only a title", text="")]
    path = write_lines(tmp_path / "c.jsonl", rows)
    result = read_corpus(path, on_error=on_error)
    assert result.corpus.ids == ["a", "b", "c"] and result.empty == ["e1", "e2"] and result.skipped == []
    with caplog.at_level(logging.WARNING, logger="serve_app.corpus"):
        assert load_corpus(path, on_error=on_error).ids == ["a", "b", "c"]
    assert "left out 2 empty document(s)" in caplog.text and "'e1', 'e2'" in caplog.text
    # A duplicate id is still an error, empty or not; a file of empty documents only has no documents.
    with pytest.raises(CorpusError, match="duplicate document id 'a'"):
        load_corpus(write_lines(tmp_path / "d.jsonl", [rec(id="a", text="x"), rec(id="a", text="")]))
    with pytest.raises(CorpusError, match=r"no documents \(1 empty documents left out\)"):
        load_corpus(write_lines(tmp_path / "e.jsonl", [rec(id="z", text="")]))


def test_file_level_errors(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        load_corpus(tmp_path / "missing.jsonl")
    with pytest.raises(CorpusError, match="unsupported corpus file name"):
        load_corpus(write_lines(tmp_path / "c.csv", ["a,b"]))
    with pytest.raises(CorpusError, match="no documents"):
        load_corpus(write_lines(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(CorpusError, match="no documents .1 bad lines skipped"):
        load_corpus(write_lines(tmp_path / "allbad.jsonl", ["nope"]), on_error="skip")
    not_gzip = tmp_path / "c.jsonl.gz"
    not_gzip.write_text(rec(id="a", text="plain text, not gzip"))
    with pytest.raises(CorpusError, match="cannot read file"):
        load_corpus(not_gzip)
    with pytest.raises(ValueError, match="on_error"):
        load_corpus(tmp_path / "c.jsonl", on_error="ignore")  # type: ignore[arg-type]


def test_truncated_gzip(tmp_path):
    path = write_lines(tmp_path / "c.jsonl.gz", [rec(id=str(i), text="word " * 50) for i in range(200)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match=r"c\.jsonl\.gz: line \d+: cannot read file"):
        load_corpus(path)


# --------------------------------------------------------------------------- document store


def test_write_documents_round_trip(tmp_path):
    corpus = Corpus.from_documents(
        [Document("1", "naïve café ☕", "Tïtle", {"k": [1, 2], "n": None}), Document("2", "line\nbreak \"quoted\"")]
    )
    path = tmp_path / "documents.jsonl"
    write_documents_jsonl(corpus, path)
    assert load_corpus(path) == corpus
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert first == {"id": "1", "title": "Tïtle", "text": "naïve café ☕", "metadata": {"k": [1, 2], "n": None}}


def test_write_documents_rejects_unserialisable_metadata(tmp_path):
    with pytest.raises(CorpusError, match="document 'x': metadata is not JSON-serialisable"):
        write_documents_jsonl([Document("x", "t", metadata={"s": {1, 2}})], tmp_path / "d.jsonl")


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=10), _text.filter(str.strip), _text, st.dictionaries(st.text(max_size=5), st.integers() | _text, max_size=3)),
        min_size=1,
        max_size=8,
        unique_by=lambda t: t[0],
    )
)
def test_write_load_property(tmp_path, rows):
    corpus = Corpus.from_documents([Document(i, text, title, meta) for i, text, title, meta in rows])
    path = tmp_path / "prop.jsonl"
    write_documents_jsonl(corpus, path)
    assert load_corpus(path) == corpus


# --------------------------------------------------------------------------- queries, qrels, BEIR


def test_load_queries(tmp_path):
    q = load_queries(write_lines(tmp_path / "q.jsonl", [rec(_id="1", text="what is x", metadata={}), rec(_id="2", text="why")]))
    assert q == {"1": "what is x", "2": "why"} and list(q) == ["1", "2"]
    assert load_queries(write_lines(tmp_path / "q2.jsonl.gz", [rec(id="a", text="plain ids")])) == {"a": "plain ids"}
    with pytest.raises(CorpusError, match=r"line 2: duplicate query id '1' \(first seen on line 1\)"):
        load_queries(write_lines(tmp_path / "q3.jsonl", [rec(_id="1", text="a"), rec(_id="1", text="b")]))
    with pytest.raises(CorpusError, match=r"q4\.jsonl: line 1: query '1' has empty text"):
        load_queries(write_lines(tmp_path / "q4.jsonl", [rec(_id="1", text=" ")]))
    with pytest.raises(CorpusError, match=r"line 1: missing field 'text'"):
        load_queries(write_lines(tmp_path / "q5.jsonl", [rec(_id="1")]))


def test_load_qrels(tmp_path):
    path = tmp_path / "test.tsv"
    path.write_text("query-id\tcorpus-id\tscore\n1\td1\t1\n1\td2\t2\n\n2\td1\t0\n1\td1\t1\n")
    assert load_qrels(path) == {"1": {"d1": 1, "d2": 2}, "2": {"d1": 0}}


@pytest.mark.parametrize(
    "content,message",
    [
        ("q\td\tscore\n1\td1\t1\n", r"line 1: expected the header"),
        ("query-id\tcorpus-id\tscore\n1\td1\n", r"line 2: expected 3 tab-separated columns"),
        ("query-id\tcorpus-id\tscore\n1\td1\thigh\n", r"line 2: score 'high' is not an integer"),
        ("query-id\tcorpus-id\tscore\n1\td1\t1\n1\td1\t2\n", r"line 3: \('1', 'd1'\) judged 2 here and 1 on line 2"),
        ("", r"empty qrels file"),
    ],
)
def test_bad_qrels(tmp_path, content, message):
    path = tmp_path / "q.tsv"
    path.write_text(content)
    with pytest.raises(CorpusError, match=message) as err:
        load_qrels(path)
    assert str(path) in str(err.value)


def make_beir(root: Path) -> Path:
    write_lines(root / "corpus.jsonl", [rec(_id=f"d{i}", title=f"T{i}", text=f"text {i}") for i in range(4)])
    write_lines(root / "queries.jsonl", [rec(_id=q, text=f"query {q}") for q in ("q1", "q2", "q3")])
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td0\t1\nq3\td2\t1\nq3\td3\t1\n")
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq2\td1\t1\n")
    return root


def test_load_beir_keeps_judged_queries(tmp_path):
    root = make_beir(tmp_path)
    ds = load_beir(root)
    assert ds.corpus.ids == ["d0", "d1", "d2", "d3"] and ds.empty_documents == [] and ds.skipped == []
    assert ds.queries == {"q1": "query q1", "q3": "query q3"}
    assert ds.qrels == {"q1": {"d0": 1}, "q3": {"d2": 1, "d3": 1}}
    assert load_beir(root, split="train").queries == {"q2": "query q2"}


def test_load_beir_errors(tmp_path, caplog):
    root = make_beir(tmp_path)
    with pytest.raises(CorpusError, match=r"dev\.tsv: no such qrels file \(available splits: test, train\)"):
        load_beir(root, split="dev")
    (root / "qrels" / "bad.tsv").write_text("query-id\tcorpus-id\tscore\nq9\td0\t1\n")
    with pytest.raises(CorpusError, match=r"1 judged query id\(s\) not in the queries file, e.g. \['q9'\]"):
        load_beir(root, split="bad")
    (root / "qrels" / "ghost.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tnot-a-doc\t1\n")
    with caplog.at_level(logging.WARNING, logger="serve_app.corpus"):
        assert load_beir(root, split="ghost").queries == {"q1": "query q1"}
    assert "not-a-doc" in caplog.text
    with pytest.raises(CorpusError, match="no such dataset directory"):
        load_beir(tmp_path / "nope")
    (root / "corpus.jsonl").unlink()
    with pytest.raises(CorpusError, match=r"neither corpus\.jsonl nor corpus\.jsonl\.gz"):
        load_beir(root)


@pytest.mark.scifact
def test_load_scifact(scifact_dir):
    ds = load_beir(scifact_dir, split="test")
    with gzip.open(scifact_dir / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        raw_ids = [json.loads(line)["_id"] for line in f if line.strip()]
    rows = [line.split("\t") for line in (scifact_dir / "qrels" / "test.tsv").read_text().splitlines()[1:] if line.strip()]
    assert ds.corpus.ids == raw_ids
    assert set(ds.queries) == {r[0] for r in rows}
    assert sum(len(v) for v in ds.qrels.values()) == len(rows)
    doc = ds.corpus.get(rows[0][1])
    assert doc is not None and doc.title and doc.content.startswith(doc.title + " ")
