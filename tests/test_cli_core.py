"""``serve-app index`` and ``serve-app eval`` driven through serve_app.cli.main on a tiny BEIR dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_app import cli
from serve_app.index import load_index, read_manifest

# Each topic's words occur only in its own document, so BM25 ranks it first for its query.
TOPICS = {
    "d1": ("ocean sea", "river water climate weather rain"),
    "d2": ("football", "soccer tennis match team player goal season"),
    "d3": ("music", "song album band guitar piano concert"),
    "d4": ("space", "star planet moon sun earth orbit rocket telescope galaxy"),
    "d5": ("food", "bread coffee tea wine cheese recipe cooking kitchen"),
    "d6": ("history", "war king empire city country government election"),
    "d7": ("garden", "plant plants tree trees flower"),
    "d8": ("cells", "protein gene dna rna expression"),
}
QUERIES = {"q1": "rain climate", "q2": "soccer player", "q3": "guitar album", "q4": "rocket telescope", "q5": "cheese recipe"}
QRELS = {"q1": "d1", "q2": "d2", "q3": "d3", "q4": "d4", "q5": "d5"}


@pytest.fixture(autouse=True)
def core_commands_only(monkeypatch):
    """Only this module's sub-commands: the test does not depend on the other command modules."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("serve_app.commands.core",))


@pytest.fixture
def beir_dir(tmp_path) -> Path:
    d = tmp_path / "toyset"
    (d / "qrels").mkdir(parents=True)
    with open(d / "corpus.jsonl", "w") as f:
        for doc_id, (title, text) in TOPICS.items():
            f.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with open(d / "queries.jsonl", "w") as f:
        for qid, text in QUERIES.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{doc}\t1\n" for q, doc in QRELS.items()))
    return d


def test_index_builds_both_retrievers_and_prints_a_summary(beir_dir, tmp_path, tiny_bi_encoder_dir, capsys):
    out = tmp_path / "idx"
    rc = cli.main(["index", "--corpus", str(beir_dir), "--out", str(out), "--dense-model", str(tiny_bi_encoder_dir), "--device", "cpu", "--k1", "1.2", "-q"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"index written to {out}" in printed
    assert "documents: 8, chunks: 8" in printed
    assert "bm25: engine bm25s, method lucene, k1=1.2, b=0.4" in printed
    assert "dense: model" in printed and "FAISS Flat, 8 vectors" in printed
    loaded = load_index(out)
    assert loaded.corpus.ids == list(TOPICS)
    assert [h.doc_id for h in loaded.bm25.search("guitar album", 3)][:1] == ["d3"]
    assert len(loaded.dense.search("guitar album", 3)) == 3


def test_index_chunking_and_single_retriever(beir_dir, tmp_path, capsys):
    out = tmp_path / "idx"
    rc = cli.main(["index", "--corpus", str(beir_dir / "corpus.jsonl"), "--out", str(out), "--no-dense", "--chunk-size", "8", "--chunk-stride", "4", "-q"])
    assert rc == 0
    manifest = read_manifest(out)
    assert manifest.dense is None and manifest.bm25 is not None
    assert manifest.chunking.enabled and (manifest.chunking.size, manifest.chunking.stride) == (8, 4)
    assert manifest.corpus.num_chunks > manifest.corpus.num_documents
    assert "chunking: 8 words, stride 4" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--no-bm25", "--no-dense"], "--no-bm25 and --no-dense together leave nothing to index"),
        (["--no-dense", "--chunk-size", "10", "--chunk-stride", "20"], "invalid chunking options: chunking: Value error, chunking.stride (20) must not exceed chunking.size (10)"),
        (["--no-dense", "--k1", "-1"], "invalid bm25 options: k1: Input should be greater than 0"),
    ],
)
def test_index_option_errors(beir_dir, tmp_path, capsys, extra, message):
    rc = cli.main(["index", "--corpus", str(beir_dir), "--out", str(tmp_path / "idx"), "-q", *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("serve-app index: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "idx").exists()


def test_index_bad_corpus_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": 3}\n')
    assert cli.main(["index", "--corpus", str(bad), "--out", str(tmp_path / "idx"), "--no-dense", "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: line 2: field 'text' must be a string" in err
    assert cli.main(["index", "--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "idx"), "--no-dense"]) == 2
    assert "no such corpus file or directory" in capsys.readouterr().err
    assert cli.main(["index", "--corpus", str(tmp_path), "--out", str(tmp_path / "idx"), "--no-dense"]) == 2
    assert "without corpus.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_all_pipelines_with_tiny_models(beir_dir, tmp_path, tiny_bi_encoder_dir, tiny_cross_encoder_dir, capsys):
    work = tmp_path / "work"
    args = [
        "eval", "--dataset", str(beir_dir), "--pipeline", "bm25,dense", "--pipeline", "hybrid,hybrid+rerank",
        "--work-dir", str(work), "--dense-model", str(tiny_bi_encoder_dir), "--reranker", str(tiny_cross_encoder_dir),
        "--device", "cpu", "--top-k", "5", "--rerank-top-m", "4", "-q",
    ]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "building index" in printed
    out = work / "results" / "toyset-test"
    payload = json.loads((out / "metrics.json").read_text())
    results = payload["results"]
    assert list(results) == ["bm25", "dense", "hybrid", "hybrid+rerank"]
    for metrics in results.values():
        assert list(metrics) == ["nDCG@10", "R@100", "RR@10"]
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    # Every query's words occur only in its relevant document: BM25 is perfect.
    assert results["bm25"] == {"nDCG@10": 1.0, "R@100": 1.0, "RR@10": 1.0}
    # With 8 documents and 5 candidates per retriever, the hybrid pool holds every relevant one.
    assert results["hybrid"]["R@100"] == 1.0
    assert payload["meta"]["queries"] == 5 and payload["meta"]["top_k"] == 5 and payload["meta"]["rerank_top_m"] == 4
    md = (out / "metrics.md").read_text()
    assert "| bm25 | 1.0000 | 1.0000 | 1.0000 |" in md and "| bm25 | 1.0000 | 1.0000 | 1.0000 |" in printed
    assert read_manifest(work / "indexes" / "toyset").dense is not None

    # Second run: the cached index is reused, results land in --out.
    assert cli.main(["eval", "--dataset", str(beir_dir), "--pipeline", "bm25", "--work-dir", str(work), "--out", str(tmp_path / "r2"), "-q", "--measures", "P@1,nDCG@3"]) == 0
    assert "building index" not in capsys.readouterr().out
    assert json.loads((tmp_path / "r2" / "metrics.json").read_text())["results"] == {"bm25": {"P@1": 1.0, "nDCG@3": 1.0}}
    run_lines = (tmp_path / "r2" / "runs" / "bm25.trec").read_text().splitlines()
    # BM25 retrieves only each query's own document here (the toy queries share no words)
    assert [line.split() for line in run_lines] == [[f"q{i}", "Q0", f"d{i}", "1", "1", "bm25"] for i in range(1, 6)]


@pytest.mark.slow
def test_eval_rerank_blends_score_each_pair_once(beir_dir, tmp_path, tiny_bi_encoder_dir, tiny_cross_encoder_dir, capsys, monkeypatch):
    from serve_app.eval import evaluate
    from serve_app.rerank.reranker import Reranker

    calls: list[int] = []
    original = Reranker.rerank_many

    def counting(self, requests):
        calls.append(sum(len(r.documents) for r in requests))
        return original(self, requests)

    monkeypatch.setattr(Reranker, "rerank_many", counting)
    out = tmp_path / "out"
    args = [
        "eval", "--dataset", str(beir_dir), "--pipeline", "hybrid+rerank", "--rerank-blend", "none,rrf", "--work-dir", str(tmp_path / "w"),
        "--dense-model", str(tiny_bi_encoder_dir), "--reranker", str(tiny_cross_encoder_dir), "--device", "cpu", "--top-k", "5", "--rerank-top-m", "4", "--out", str(out), "-q",
    ]
    assert cli.main(args) == 0
    payload = json.loads((out / "metrics.json").read_text())
    assert list(payload["results"]) == ["hybrid+rerank", "hybrid+rerank (rrf blend)"] and payload["meta"]["rerank_blends"] == ["none", "rrf"]
    assert sum(calls) == 5 * 4  # 5 queries x 4 reranked candidates, scored once for both blends
    # ... but each row is charged the pairs its configuration sends, reused scores included
    cost = payload["meta"]["rerank_cost"]
    assert cost["hybrid+rerank"]["rerank"]["pairs_per_query"] == 4 and cost["hybrid+rerank (rrf blend)"]["rerank"]["pairs_per_query"] == 4
    assert payload["meta"]["loadavg_start"] >= 0 and payload["meta"]["started"].endswith("+00:00")
    qrels = {}
    for line in (beir_dir / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, rel = line.split("\t")
        qrels.setdefault(q, {})[d] = int(rel)
    for name, file in (("hybrid+rerank", "hybrid+rerank.trec"), ("hybrid+rerank (rrf blend)", "hybrid+rerank-rrf-blend.trec")):
        run: dict = {}
        for line in (out / "runs" / file).read_text().splitlines():
            q, _, d, rank, score, tag = line.split()
            run.setdefault(q, {})[d] = float(score)
        assert tag == "_".join(name.split())
        assert evaluate(run, qrels) == pytest.approx(payload["results"][name])
    assert cli.main([*args[:6], "cosine", *args[7:]]) == 2
    assert "--rerank-blend: unknown blend 'cosine'" in capsys.readouterr().err


def test_eval_bm25_builds_missing_index_into_given_dir(beir_dir, tmp_path, capsys):
    idx = tmp_path / "explicit"
    assert cli.main(["eval", "--dataset", str(beir_dir), "--pipeline", "bm25", "--index", str(idx), "--out", str(tmp_path / "o"), "-q", "--top-k", "3"]) == 0
    manifest = read_manifest(idx)
    assert manifest.bm25 is not None and manifest.dense is None
    assert "| bm25 | 1.0000 | 1.0000 | 1.0000 |" in capsys.readouterr().out
    # The explicit index lacks a dense retriever: a clear error, no silent rebuild.
    assert cli.main(["eval", "--dataset", str(beir_dir), "--pipeline", "hybrid", "--index", str(idx), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"--index {idx} has no dense retriever" in err
    assert read_manifest(idx).dense is None


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pipeline", "splade"], "--pipeline: unknown pipeline 'splade'"),
        (["--split", "dev"], "no such qrels file (available splits: test)"),
        (["--measures", "nDCG@@3"], "--measures: unknown evaluation measure 'nDCG@@3'"),
        (["--fusion", "weighted", "--weights", "bm25:1"], "--weights: expected NAME=WEIGHT"),
        (["--top-k", "0"], "--top-k must be >= 1"),
    ],
)
def test_eval_errors(beir_dir, tmp_path, capsys, extra, message):
    rc = cli.main(["eval", "--dataset", str(beir_dir), "--work-dir", str(tmp_path / "w"), "--pipeline", "bm25", "-q", *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("serve-app eval: error: ") and message in err


def test_eval_index_over_another_corpus(beir_dir, tmp_path, capsys):
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "x", "text": "something else entirely"}\n')
    assert cli.main(["index", "--corpus", str(other), "--out", str(tmp_path / "idx"), "--no-dense", "-q"]) == 0
    assert cli.main(["eval", "--dataset", str(beir_dir), "--pipeline", "bm25", "--index", str(tmp_path / "idx"), "-q"]) == 2
    assert "was built over another corpus" in capsys.readouterr().err


def _with_empty_documents(beir_dir: Path) -> list[str]:
    """Add Cranfield-style records with no text (one with a whitespace title) to the toy corpus."""
    empty = ["e1", "e2"]
    with open(beir_dir / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"_id": "e1", "title": "", "text": ""}) + "\n")
        f.write(json.dumps({"_id": "e2", "title": "  ", "text": "\n"}) + "\n")
    return empty


def test_index_leaves_out_empty_documents_and_says_so(beir_dir, tmp_path, capsys):
    empty = _with_empty_documents(beir_dir)
    out = tmp_path / "idx"
    assert cli.main(["index", "--corpus", str(beir_dir), "--out", str(out), "--no-dense", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "documents: 8, chunks: 8" in printed
    assert "2 empty document(s) left out (no title and no text: e1, e2)" in printed
    assert load_index(out).corpus.ids == list(TOPICS) and not set(empty) & set(load_index(out).corpus.ids)


@pytest.mark.slow
def test_eval_on_a_corpus_with_empty_documents_succeeds_and_reports_them(beir_dir, tmp_path, tiny_bi_encoder_dir, capsys):
    _with_empty_documents(beir_dir)
    with open(beir_dir / "corpus.jsonl", "a") as f:
        f.write("not json\n")  # and a malformed line, skipped on request
    out = tmp_path / "out"
    args = ["eval", "--dataset", str(beir_dir), "--pipeline", "bm25,hybrid", "--work-dir", str(tmp_path / "w"), "--out", str(out), "--dense-model", str(tiny_bi_encoder_dir), "--device", "cpu", "-q"]
    assert cli.main(args) == 2  # a malformed line still stops eval, naming it, unless asked to skip
    assert "line 11: invalid JSON" in capsys.readouterr().err
    assert cli.main([*args, "--skip-bad-lines"]) == 0
    printed = capsys.readouterr().out
    assert "corpus: 1 bad line(s) skipped; 2 empty document(s) left out (no title and no text: e1, e2)" in printed
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["results"]["bm25"] == {"nDCG@10": 1.0, "R@100": 1.0, "RR@10": 1.0}
    assert payload["meta"]["empty_documents_left_out"] == ["e1", "e2"] and payload["meta"]["skipped_corpus_lines"] == 1
    assert payload["meta"]["documents"] == 8


def test_eval_refuses_to_report_a_degraded_run(beir_dir, tmp_path, capsys, monkeypatch):
    """A stage that fails would silently lower the metrics: eval stops and names it instead."""
    from serve_app.retrieval.bm25 import BM25Retriever

    def broken(self, queries, k):
        raise OSError("index file vanished")

    monkeypatch.setattr(BM25Retriever, "search_batch", broken)
    assert cli.main(["eval", "--dataset", str(beir_dir), "--pipeline", "bm25", "--work-dir", str(tmp_path / "w"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "every requested retriever failed (bm25: OSError: index file vanished)" in err


@pytest.mark.slow
def test_eval_depths_and_a_cascade(beir_dir, tmp_path, tiny_bi_encoder_dir, tiny_cross_encoder_dir, capsys):
    from serve_app.testing import build_tiny_cross_encoder

    small = build_tiny_cross_encoder(tmp_path / "small", seed=9)
    common = ["--dataset", str(beir_dir), "--pipeline", "hybrid+rerank", "--work-dir", str(tmp_path / "w"), "--dense-model", str(tiny_bi_encoder_dir),
              "--reranker", str(tiny_cross_encoder_dir), "--device", "cpu", "--top-k", "5", "-q"]
    # several depths: one row each, the pairs they share scored once
    assert cli.main(["eval", *common, "--rerank-top-m", "4,2", "--out", str(tmp_path / "d")]) == 0
    payload = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert list(payload["results"]) == ["hybrid+rerank@4", "hybrid+rerank@2"] and payload["meta"]["rerank_top_m"] == [4, 2]
    cost = payload["meta"]["rerank_cost"]
    assert cost["hybrid+rerank@4"]["rerank"]["pairs_per_query"] == 4 and cost["hybrid+rerank@2"]["rerank"]["pairs_per_query"] == 2
    single = tmp_path / "s"
    assert cli.main(["eval", *common, "--rerank-top-m", "2", "--out", str(single)]) == 0
    assert json.loads((single / "metrics.json").read_text())["results"]["hybrid+rerank"] == payload["results"]["hybrid+rerank@2"]
    # a cascade: the small model on the fused top 4, the reranker on its top 2
    out = tmp_path / "c"
    assert cli.main(["eval", *common, "--cascade", f"{small}=4", "--rerank-top-m", "2", "--out", str(out)]) == 0
    meta = json.loads((out / "metrics.json").read_text())["meta"]
    from serve_app.config import CrossEncoderConfig

    assert meta["cascade"] == [{"name": "stage1", "model": str(small), "top_m": 4, "blend": "none", "max_length": CrossEncoderConfig().max_length}]
    assert meta["rerank_cost"]["hybrid+rerank"]["rerank.stage1"]["pairs_per_query"] == 4
    assert meta["rerank_cost"]["hybrid+rerank"]["rerank"]["pairs_per_query"] == 2
    assert "rerank.stage1 4.0 pairs/query" in capsys.readouterr().out
    # the cheap stage may read shorter pairs than the final reranker
    assert cli.main(["eval", *common, "--cascade", f"{small}=4", "--cascade-max-length", "32", "--rerank-top-m", "2", "--out", str(tmp_path / "c32")]) == 0
    meta32 = json.loads((tmp_path / "c32" / "metrics.json").read_text())["meta"]
    assert meta32["cascade"][0]["max_length"] == 32
    for bad in (f"{small}=1", f"{small}", "=3"):
        assert cli.main(["eval", *common, "--cascade", bad, "--rerank-top-m", "2", "--out", str(out)]) == 2


@pytest.mark.slow
def test_eval_reports_fidelity_to_a_reference_row_or_trec_file(beir_dir, tmp_path, tiny_bi_encoder_dir, tiny_cross_encoder_dir, capsys):
    from serve_app.eval import fidelity, read_trec_run

    common = ["--dataset", str(beir_dir), "--pipeline", "hybrid,hybrid+rerank", "--work-dir", str(tmp_path / "w"), "--dense-model", str(tiny_bi_encoder_dir),
              "--reranker", str(tiny_cross_encoder_dir), "--device", "cpu", "--top-k", "5", "--rerank-top-m", "5,2", "-q"]
    out = tmp_path / "f"
    assert cli.main(["eval", *common, "--reference", "hybrid+rerank@5", "--fidelity-k", "3", "--out", str(out)]) == 0
    payload = json.loads((out / "metrics.json").read_text())
    results = payload["results"]
    assert payload["meta"]["fidelity_reference"] == "hybrid+rerank@5" and payload["meta"]["fidelity_k"] == 3
    assert results["hybrid+rerank@5"]["overlap@3"] == 1.0 and results["hybrid+rerank@5"]["kendall_tau@3"] == 1.0
    reference = read_trec_run(out / "runs" / "hybrid+rerank@5.trec")
    for name, file in (("hybrid", "hybrid.trec"), ("hybrid+rerank@2", "hybrid+rerank@2.trec")):
        expected = fidelity(read_trec_run(out / "runs" / file), reference, k=3)
        assert results[name]["overlap@3"] == pytest.approx(expected["overlap@3"])
        assert results[name]["kendall_tau@3"] == pytest.approx(expected["kendall_tau@3"])
    assert "overlap@3" in (out / "metrics.md").read_text()
    # a reference TREC file from an earlier run gives the same figures
    again = tmp_path / "g"
    assert cli.main(["eval", *common, "--reference", str(out / "runs" / "hybrid+rerank@5.trec"), "--fidelity-k", "3", "--out", str(again)]) == 0
    again_results = json.loads((again / "metrics.json").read_text())["results"]
    assert list(again_results) == list(results)
    for name, metrics in results.items():
        assert again_results[name] == pytest.approx(metrics)
    # a reference that is neither a row nor a file is a usage error
    assert cli.main(["eval", *common, "--reference", "hybrid+rerank@7", "--out", str(tmp_path / "h")]) == 2
    assert "--reference 'hybrid+rerank@7' is neither a row" in capsys.readouterr().err
