"""The benchmark scripts run end to end at tiny sizes and write their results; their helpers compute the right figures.

These check behaviour (files written, figures consistent), never speed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks import common
from benchmarks.loadgen import Record, LoadResult, check_loopback
from tests.capabilities import openvino_runs_bf16


# --------------------------------------------------------------------------- helpers


def test_summarize_median_and_spread():
    s = common.summarize([3.0, 1.0, 2.0, 10.0])
    assert s["n"] == 4 and s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 10.0
    assert s["p25"] <= s["median"] <= s["p75"]
    assert math.isnan(common.summarize([])["median"])


def test_latency_percentiles_are_milliseconds():
    p = common.latency_percentiles([0.010] * 99 + [1.0])
    assert p["p50"] == pytest.approx(10.0)
    assert p["p99"] > 10.0 and p["p99"] <= 1000.0


def test_target_line_directions():
    assert common.target_line("x", 1.2, 1.0)["met"] is True
    assert common.target_line("x", 0.9, 1.0)["met"] is False
    assert common.target_line("x", 12.0, 15.0, "ms", higher_is_better=False)["met"] is True
    assert common.target_line("x", None, 1.0)["met"] is None
    md = common.targets_markdown([common.target_line("a", 0.5, 1.0), common.target_line("b", None, 1.0)])
    assert "MISSED" in md and "not measured" in md


def test_md_table_shape():
    t = common.md_table(["a", "b"], [(1, 2), (3, 4)])
    lines = t.strip().splitlines()
    assert lines[0] == "| a | b |" and len(lines) == 4


def test_machine_info_has_load_and_cpu():
    m = common.machine_info()
    assert m["nproc"] >= 1 and len(m["loadavg"]) == 3 and m["cpu_model"]


def test_loadgen_refuses_non_loopback_targets():
    check_loopback("http://127.0.0.1:8000/rerank")
    check_loopback("http://localhost:1/x")
    with pytest.raises(ValueError, match="loopback"):
        check_loopback("http://example.com/rerank")
    with pytest.raises(ValueError, match="loopback"):
        check_loopback("http://10.0.0.1:8000/")


def test_load_result_summary_counts_units_over_the_span():
    recs = [Record(0, 0.0, 1.0, 200, units=10), Record(1, 0.5, 2.0, 200, units=10), Record(2, 1.0, 1.5, 500, units=10, error="boom")]
    s = LoadResult(2, recs, 2.0).summary()
    assert s["ok"] == 2 and s["errors"] == 1
    assert s["span_s"] == pytest.approx(2.0)
    assert s["units_per_s"] == pytest.approx(10.0)  # 20 units of the ok requests over 2 s
    assert s["p50_ms"] == pytest.approx(1250.0)


def test_zipf_corpus_is_seeded_and_queries_avoid_stopwords():
    from benchmarks.bm25_engines import zipf_corpus, zipf_queries

    a, b = zipf_corpus(50, 20000, 80, seed=3), zipf_corpus(50, 20000, 80, seed=3)
    assert a == b and len(a) == 50
    qs = zipf_queries(a, 20, seed=3)
    assert qs == zipf_queries(a, 20, seed=3)
    assert all(1 <= len(q) <= 6 and len(q) == len(set(q)) for q in qs)
    stop = {f"w{i}" for i in range(100)}
    assert not any(w in stop for q in qs for w in q)


def test_clustered_vectors_are_unit_norm_and_recall_is_exact_on_itself():
    from benchmarks.faiss_indexes import clustered_vectors, recall_at_k

    x = clustered_vectors(300, 32, clusters=10, latent_dim=8, noise=0.1, seed=0, anisotropy=0.4)
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    ids = np.argsort(-(x[:20] @ x.T), axis=1)[:, :10]
    assert recall_at_k(ids, ids) == 1.0
    assert recall_at_k(ids, ids[:, ::-1]) == 1.0  # order inside the top-10 does not matter
    assert recall_at_k(ids, ids + 1000) == 0.0


def test_profile_summary_buckets(tmp_path):
    from benchmarks.rerank_peers import summarize_profile

    f = tmp_path / "p.txt"
    f.write_text(
        "Thread.run (t.py:1);Reranker.rerank_many (r.py:1);PairScorer.score (c.py:1);PairScorer._forward (c.py:2);TorchRuntime.__call__ (rt.py:1);Module._call_impl (m.py:1);Linear.forward (l.py:1) 30\n"
        "Thread.run (t.py:1);Reranker.rerank_many (r.py:1);PairScorer.score (c.py:1);PairTokenizer.features (c.py:3) 10\n"
        "Worker.main_loop (ray/_private/worker.py:1) 10\n"
    )
    s = summarize_profile(f)
    assert s["samples"] == 50
    assert s["buckets"]["model forward (torch / ONNX Runtime / OpenVINO)"] == pytest.approx(0.6)
    assert s["buckets"]["tokenize pairs"] == pytest.approx(0.2)
    assert s["top_leaves"][0][0].startswith("Linear.forward")


# --------------------------------------------------------------------------- scripts end to end


def _load(out: Path, name: str) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    assert (out / "summary.md").is_file()
    assert data["benchmark"] == name and data["machine"]["nproc"] >= 1 and len(data["loadavg_end"]) == 3
    return data


@pytest.mark.slow
def test_faiss_indexes_tiny(tmp_path):
    from benchmarks import faiss_indexes

    out = tmp_path / "faiss"
    faiss_indexes.main(["--vectors", "2000", "--queries", "40", "--single-queries", "10", "--repeats", "1", "--ivfpq", "IVF16,PQ8",
                        "--ef-search", "16,64", "--nprobe", "4", "--clusters", "20", "--real-index", str(tmp_path / "none"), "--out", str(out)])
    data = _load(out, "faiss_indexes")
    idx = data["results"]["indexes"]
    assert idx["Flat"]["settings"][0]["recall@10"] == 1.0
    assert [e["value"] for e in idx["HNSW32"]["settings"]] == [16, 64]
    assert all(0.0 <= e["recall@10"] <= 1.0 for e in idx["IVF16,PQ8"]["settings"])
    assert (out / "recall_vs_qps.png").is_file()
    assert len(data["targets"]) == 4  # single/batch calls x CPU/wall clock
    flat = idx["Flat"]["settings"][0]
    assert flat["single_speedup_vs_flat"] == 1.0 and flat["batch_speedup_vs_flat_cpu"] == 1.0


@pytest.mark.slow
@pytest.mark.scifact
def test_bm25_engines_tiny(tmp_path, scifact_dir):
    from benchmarks import bm25_engines

    out = tmp_path / "bm25"
    bm25_engines.main(["--scifact", str(scifact_dir), "--scifact-queries", "10", "--synthetic-docs", "300", "--synthetic-queries", "10",
                       "--rank-bm25-queries", "5", "--vocab", "2000", "--repeats", "1", "--out", str(out)])
    data = _load(out, "bm25_engines")
    sf = data["results"]["scifact"]["engines"]
    assert sf["rank_bm25"]["queries_timed"] == 10 and sf["rank_bm25"]["speedup_wall"] == 1.0
    # Same BM25 variant and tokens: bm25s and the service's retriever agree with rank_bm25.
    assert sf["bm25s"]["top10_agreement_vs_rank_bm25"] >= 0.95
    assert sf["serve_app"]["top10_agreement_vs_rank_bm25"] >= 0.95
    assert data["results"]["synthetic"]["documents"] == 300


@pytest.mark.slow
@pytest.mark.scifact
def test_batching_ablation_tiny(tmp_path, scifact_dir, tiny_cross_encoder_dir):
    from benchmarks import batching_ablation

    out = tmp_path / "abl"
    batching_ablation.main(["--scifact", str(scifact_dir), "--model", str(tiny_cross_encoder_dir), "--queries", "1", "--depth", "12",
                            "--max-length", "64", "--batch-sizes", "4", "--max-batch-tokens", "256", "--repeats", "1", "--out", str(out)])
    data = _load(out, "batching_ablation")
    st = data["results"]["strategies"]
    assert set(st) == {"naive-4", "sorted-4", "token-budget", "scorer.score", "CrossEncoder.predict"}
    # Sorting never pads more than input order at the same batch size, and scores do not depend on batching.
    assert st["sorted-4"]["padded_token_fraction"] <= st["naive-4"]["padded_token_fraction"]
    ours = {k: v for k, v in st.items() if k != "CrossEncoder.predict"}
    assert all(s["max_abs_score_diff_vs_naive"] < 1e-4 for s in ours.values())
    # CrossEncoder.predict truncates with longest_first (the query too), ours only the document:
    # with the tiny model's character-level vocabulary at 64 tokens the queries themselves get cut,
    # so its scores are only required to exist here (parity without that: test_cross_encoder.py).
    assert np.isfinite(st["CrossEncoder.predict"]["max_abs_score_diff_vs_naive"])


@pytest.mark.slow
@pytest.mark.scifact
def test_cpu_runtimes_tiny(tmp_path, scifact_dir, tiny_cross_encoder_dir):
    from benchmarks import cpu_runtimes

    out = tmp_path / "rt"
    cpu_runtimes.main(["--scifact", str(scifact_dir), "--model", str(tiny_cross_encoder_dir), "--queries", "2", "--depth", "6",
                       "--max-length", "64", "--repeats", "1", "--threads", "1", "--out", str(out)])
    results = _load(out, "cpu_runtimes")["results"]
    rt = results["runtimes"]
    assert set(rt) == {"torch-float32", "torch-bfloat16", "onnx-float32", "onnx-int8", "openvino-float32", "openvino-bfloat16", "torch-int8-dynamic"}, results["notes"]
    ref = rt["torch-float32"]
    assert ref["max_abs_score_diff"] == 0 and ref["mean_kendall_tau"] == pytest.approx(1.0) and ref["same_top1_share"] == 1.0
    assert ref["load_time_probe_drift"] is None  # the reference is not checked against itself
    # The exports compute the same function in float32; the lower precisions only approximate it.
    for name in ("onnx-float32", "openvino-float32"):
        assert rt[name]["max_abs_score_diff"] < 1e-4, name
        assert rt[name]["load_time_probe_drift"]["max_abs_diff"] < 1e-4
    lower = ["torch-bfloat16", "onnx-int8", "torch-int8-dynamic"]
    if openvino_runs_bf16():
        lower.append("openvino-bfloat16")
    else:  # OpenVINO runs float32 on a CPU without bf16: the same function as the reference
        assert rt["openvino-bfloat16"]["max_abs_score_diff"] < 1e-4
    for name in lower:
        assert 0 < rt[name]["max_abs_score_diff"] < 1.0, name
    for name in [n for n in lower if n != "torch-int8-dynamic"]:
        assert rt[name]["load_time_probe_drift"]["max_abs_diff"] > 0, name
    assert all(r["pairs_per_s"]["median"] > 0 for r in rt.values())


@pytest.mark.slow
@pytest.mark.scifact
def test_cpu_runtimes_decoder(tmp_path, scifact_dir):
    from benchmarks import cpu_runtimes
    from benchmarks.common import decoder_model_dir

    model = decoder_model_dir(tmp_path / "dec", shape="tiny")
    out = tmp_path / "rt"
    cpu_runtimes.main(["--scifact", str(scifact_dir), "--model", str(model), "--queries", "2", "--depth", "3", "--runtimes", "torch-float32,onnx-float32,torch-bfloat16",
                       "--repeats", "1", "--threads", "1", "--out", str(out)])
    results = _load(out, "cpu_runtimes")["results"]
    assert results["kind"] == "causal_lm" and set(results["runtimes"]) == {"torch-float32", "onnx-float32", "torch-bfloat16"}
    assert results["runtimes"]["onnx-float32"]["max_abs_score_diff"] < 1e-4


@pytest.mark.slow
@pytest.mark.scifact
def test_rerank_peers_in_process_only(tmp_path, scifact_dir, tiny_cross_encoder_dir):
    from benchmarks import rerank_peers

    out = tmp_path / "peers"
    rerank_peers.main(["--scifact", str(scifact_dir), "--model", str(tiny_cross_encoder_dir), "--docs", "3", "--concurrency", "1,16",
                       "--min-requests", "2", "--max-length", "64", "--skip-infinity", "--skip-serve", "--repeats", "1", "--out", str(out)])
    data = _load(out, "rerank_peers")
    systems = data["results"]["systems"]
    assert systems["CrossEncoder.predict (in process)"]["all"]["pairs_per_s"]["median"] > 0
    assert systems["serve_app Reranker (in process)"]["all"]["pairs_per_s"]["median"] > 0
    # Nothing served was measured, so the serving targets (N >= 16) are reported as not measured.
    assert len(data["targets"]) == 2 and all(t["met"] is None for t in data["targets"])


def test_gpu_script_runs_on_cpu(tmp_path):
    from benchmarks import gpu_rerank

    out = tmp_path / "gpu"
    gpu_rerank.main(["--device", "cpu", "--tiny", "--random-init", "--decoder", "--out", str(out)])
    data = _load(out, "gpu_rerank")
    assert data["results"]["device"] == "cpu"
    assert set(data["results"]["model_only"]) == {"16", "32"}
    assert all(r["median"] > 0 for per in data["results"]["model_only"].values() for r in per.values())
    decoder = data["results"]["decoder"]["model_only"]
    assert set(decoder) == {"16", "32"} and all(set(per) == {"2", "4"} for per in decoder.values())
    assert all(r["median"] > 0 for per in decoder.values() for r in per.values())
    assert data["targets"] == []  # no 256-token figure in a tiny CPU check
    assert "not the GPU figure" in (out / "summary.md").read_text()


def test_zipf_query_stream_is_seeded_and_skewed():
    from benchmarks.score_cache import zipf_stream

    a, b = zipf_stream(300, 2000, 1.1, seed=0), zipf_stream(300, 2000, 1.1, seed=0)
    assert a == b and zipf_stream(300, 2000, 1.1, seed=1) != a
    counts = sorted((a.count(i) for i in set(a)), reverse=True)
    assert counts[0] > 10 * counts[len(counts) // 2] and all(0 <= i < 300 for i in a)


def test_adaptive_depth_reads_the_shipped_bounds_and_scores_served_answers(tmp_path):
    from benchmarks.adaptive_depth import answer_ndcg, shipped_bounds
    from benchmarks.common import REPO_ROOT

    bounds, timeouts = shipped_bounds(REPO_ROOT / "deployments.yaml")
    assert bounds["CrossEncoderReranker"]["max_queued_requests"] > 0 and "backpressure_config" in bounds["CrossEncoderReranker"]
    assert timeouts["request_timeout_s"] < 600 and timeouts["rerank_timeout_s"] < 600  # bounds a slow configuration can hit
    bare = tmp_path / "bare.yaml"
    bare.write_text("applications: [{name: a, import_path: x:y, args: {}}]\n")
    with pytest.raises(SystemExit):
        shipped_bounds(bare)
    qrels = {"q1": {"d1": 1, "d2": 1}}
    assert answer_ndcg(qrels, "q1", ["d1", "d2", "x"]) == 1.0
    assert answer_ndcg(qrels, "q1", ["x", "y"]) == 0.0
    assert 0.0 < answer_ndcg(qrels, "q1", ["x", "d2"]) < 1.0


@pytest.mark.slow
def test_docstore_memory_tiny(tmp_path):
    import json

    from benchmarks import docstore_memory

    assert docstore_memory.main(["--documents", "2000", "--doc-bytes", "200", "--lookups", "500", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out")]) == 0
    payload = json.loads((tmp_path / "out" / "docstore_memory.json").read_text())["results"]
    assert payload["documents"] == 2000 and payload["sqlite"]["bytes"] > 2000 * 150
    assert payload["sqlite"]["p50_us"] > 0 and payload["jsonl"]["peak_rss_mib"] > 0


@pytest.mark.slow
def test_sizing_tiny_and_reuse(tmp_path):
    import json

    from benchmarks import sizing

    args = ["--documents", "3000", "--vocabulary", "4000", "--words", "30", "--queries", "30", "--batch-documents", "512", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out")]
    assert sizing.main(args) == 0
    first = json.loads((tmp_path / "out" / "sizing.json").read_text())["results"]
    per_doc = first["bytes_per_document"]
    assert first["documents"] == 3000 and per_doc["dense Flat index.faiss"] == pytest.approx(384 * 4, rel=0.01)
    assert 0 < per_doc["bm25"] and 0 < per_doc["documents.sqlite"] < 3 * first["text_bytes_per_document"]
    assert set(first["ray_build"]["worker_cpu_s"]) >= {"bm25_tokenize", "bm25_score"}
    assert first["memory_mib"]["ingress-after"]["anon_added_mib"] < first["memory_mib"]["ingress-before"]["anon_added_mib"] + 50
    assert first["bm25_latency_ms"]["mean"] > 0 and first["query_encoding_cpu_ms"]["one_at_a_time"] > 0
    assert sizing.main([*args, "--reuse-index"]) == 0  # measures again on the kept index
    again = json.loads((tmp_path / "out" / "sizing.json").read_text())["results"]
    assert again["ray_build"] == first["ray_build"] and again["bytes"] == first["bytes"]


@pytest.mark.slow
@pytest.mark.scifact
def test_index_build_bm25_only(tmp_path, scifact_dir):
    import json

    from benchmarks import index_build

    assert index_build.main(["--dataset", str(scifact_dir), "--no-dense", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out")]) == 0
    r = json.loads((tmp_path / "out" / "index_build.json").read_text())["results"]
    assert r["equality"]["bm25_identical_top100_queries"] == r["equality"]["queries"] == 300
    assert set(r["builds"]) == {"local (1 process)", "--ray, 2 workers"}
    assert all(b["documents_per_s"] > 0 for b in r["builds"].values())


@pytest.mark.slow
def test_live_writes_tiny(tmp_path, scifact_dir, tiny_bi_encoder_dir):
    import json

    from benchmarks import live_writes

    assert live_writes.main(["--scifact", str(scifact_dir), "--docs", "200", "--dense-model", str(tiny_bi_encoder_dir), "--no-serve", "--repeats", "1", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out")]) == 0
    r = json.loads((tmp_path / "out" / "live_writes.json").read_text())["results"]
    assert set(r["throughput_docs_per_s"]) == {"bm25", "bm25+dense"} and r["throughput_docs_per_s"]["bm25"]["10"]["median"] > 0
    assert set(r["delta_and_merge"]["delta_search_ms"]) == {"0%", "1%", "5%", "20%"}
    assert r["delta_and_merge"]["merge"]["vectors_encoded"] == 0 and r["delta_and_merge"]["merge"]["documents"] == r["delta_and_merge"]["final_documents"]
    assert 0 < r["hnsw"]["live_recall@10"] <= 1 and r["hnsw"]["live_results_per_query_min"] == 10


def test_shards_only_build_tiny(tmp_path):
    """The driver-memory benchmark runs both builds at two sizes, compares their shards and
    reports each way's driver memory per added document."""
    import json

    from benchmarks import shards_only_build

    assert shards_only_build.main(["--documents", "300,900", "--repeats", "1", "--queries", "20", "--shards", "2", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out")]) == 0
    r = json.loads((tmp_path / "out" / "shards_only_build.json").read_text())["results"]
    assert r["sizes"] == [300, 900] and r["queries_differing"] == 0
    assert set(r["driver_peak_kib_per_document"]) == {"whole", "shards-only"}
    for n in ("300", "900"):
        for mode in ("whole", "shards-only"):
            (run,) = r["runs"][n][mode]
            assert run["documents"] == int(n) and run["peak_rss_mib"] >= run["rss_before_mib"] > 0 and run["wall_s"] > 0


def test_filtered_search_tiny(tmp_path, scifact_dir, tiny_bi_encoder_dir):
    """The filtered-search benchmark: filtered BM25 and Flat equal brute force at every
    selectivity, never short; post-filtering top-10 comes back short once the filter is selective."""
    import json

    from benchmarks import filtered_search

    assert filtered_search.main(["--scifact", str(scifact_dir), "--docs", "400", "--dense-model", str(tiny_bi_encoder_dir), "--queries", "20", "--synthetic", "3000", "--repeats", "1", "--index", str(tmp_path / "idx"), "--out", str(tmp_path / "out")]) == 0
    r = json.loads((tmp_path / "out" / "filtered_search.json").read_text())["results"]
    rows = {(x["selectivity"], x["mode"]): x for x in r["scifact"]["rows"]}
    for s in filtered_search.SELECTIVITIES:
        for mode in ("bm25 filtered", "flat filtered", "hnsw filtered"):
            assert rows[(s, mode)]["short_answers"] == 0, (s, mode)
        assert rows[(s, "bm25 filtered")]["exact_lists"] == 1.0 and rows[(s, "flat filtered")]["exact_lists"] == 1.0
    assert rows[(0.01, "hnsw post-filter top-10")]["short_answers"] > 0.5
    assert {x["mode"] for x in r["synthetic"]["rows"]} == {"hnsw + selector (in the index only)", "exact (flat scan of the admitted)", "filtered (default switch)"}
    assert all(x["recall_at_10"] >= 0.999 for x in r["synthetic"]["rows"] if x["mode"] == "exact (flat scan of the admitted)")  # float rounding may swap near-ties


def toy_beir_index(tmp_path, bi_encoder_dir):
    """The toy BEIR set of tests/test_cli_core.py (8 documents, 5 judged queries) and its index."""
    import json

    from serve_app import cli
    from tests.test_cli_core import QRELS, QUERIES, TOPICS

    d = tmp_path / "toy"
    (d / "qrels").mkdir(parents=True)
    (d / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, (t, x) in TOPICS.items()))
    (d / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in QUERIES.items()))
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{doc}\t1\n" for q, doc in QRELS.items()))
    index = tmp_path / "idx"
    assert cli.main(["index", "--corpus", str(d), "--out", str(index), "--dense-model", str(bi_encoder_dir), "--device", "cpu", "-q"]) == 0
    return d, index


@pytest.mark.slow
def test_pareto_tiny(tmp_path, tiny_bi_encoder_dir, tiny_cross_encoder_dir):
    """The Pareto benchmark runs its evals (fixed depths and a cascade) on a toy BEIR set and
    reports every row's cost and fidelity; the reference row is exact and the frontier sound."""
    import json

    from benchmarks import pareto
    d, index = toy_beir_index(tmp_path, tiny_bi_encoder_dir)
    out = tmp_path / "out"
    args = ["--scifact", str(d), "--index", str(index), "--reranker", str(tiny_cross_encoder_dir), "--dense-model", str(tiny_bi_encoder_dir),
            "--depths", "100,4,2", "--cascade-lengths", "16", "--cascade-depths", "2", "--out", str(out)]
    assert pareto.main(args) == 0
    payload = json.loads((out / "pareto.json").read_text())
    rows = {r["config"]: r for r in payload["results"]["rows"]}
    ref = rows["fixed: hybrid+rerank@100"]
    assert ref["overlap@10"] == 1.0 and ref["kendall_tau@10"] == 1.0 and ref["ce_cpu_s_per_query"] > 0
    assert rows["fixed: hybrid"]["pairs_per_query"] == 0 and rows["fixed: hybrid"]["ce_cpu_s_per_query"] == 0
    # 8 documents: the reference reranks all of them; depth 2 reranks 2 per query
    assert ref["pairs_per_query"] == 8 and rows["fixed: hybrid+rerank@2"]["pairs_per_query"] == 2
    casc = rows["cascade-16: hybrid+rerank"]
    assert casc["stage_pairs"] == {"rerank.stage1": 8, "rerank": 2} and casc["pairs_per_query"] == 10
    assert 0 <= casc["overlap@10"] <= 1
    for measure, front in payload["results"]["frontier"].items():
        assert "fixed: hybrid" in front  # the cheapest configuration is never dominated
        for name in front:  # nothing on the frontier is beaten on both axes
            r = rows[name]
            assert not any(o[measure] > r[measure] and o["ce_cpu_s_per_query"] < r["ce_cpu_s_per_query"] for o in rows.values() if o[measure] is not None)
    assert (out / "pareto.png").stat().st_size > 0 and "on the frontier of" in (out / "summary.md").read_text()
    # the table and picture can be rebuilt from the eval outputs without running them again
    assert pareto.main([*args, "--from-existing"]) == 0


@pytest.mark.slow
def test_composite_tiny(tmp_path, tiny_bi_encoder_dir, tiny_cross_encoder_dir):
    """The composite benchmark serves both systems on Ray Serve, sends them the same Zipf
    stream and reports answers/s, the ratio and the cheap system's fidelity to the fixed one."""
    import json

    from benchmarks import composite
    d, index = toy_beir_index(tmp_path, tiny_bi_encoder_dir)
    out = tmp_path / "out"
    assert composite.main(["--scifact", str(d), "--index", str(index), "--model", str(tiny_cross_encoder_dir), "--dense-model", str(tiny_bi_encoder_dir),
                           "--full-depth", "8", "--cheap-depth", "8", "--clients", "1,2", "--requests", "4", "--warmup", "4", "--repeats", "1", "--systems", "fixed,cheap", "--out", str(out)]) == 0
    payload = json.loads((out / "composite.json").read_text())
    r = payload["results"]
    assert {(x["system"], x["clients"]) for x in r["per_run"]} == {("fixed", 1), ("fixed", 2), ("cheap", 1), ("cheap", 2)}
    assert all(x["ok"] == 4 and x["errors"] == 0 for x in r["per_run"])
    # same depth, blend and model: the cache's answers are the fixed system's answers
    assert r["quality"]["cheap"]["overlap@10"] == 1.0 and r["quality"]["cheap"]["kendall_tau@10"] == 1.0
    assert 0 <= r["quality"]["fixed"]["nDCG@10"] <= 1 and set(r["ratios"]) == {"1", "2"}
    names = [t["name"] for t in payload["targets"]]
    assert names == ["cheap / the faster fixed-depth pipeline, answers/s, lowest over the client counts", "cheap fidelity to fixed, overlap@10"]
    assert "Repeats: one run" in (out / "summary.md").read_text()


def test_cancellation_verdicts_subtract_the_next_request_and_can_miss():
    from benchmarks.cancellation import verdicts

    def rep(idle, waited_next, ab_next, waited_pairs, ab_pairs):
        counts = lambda pairs: {"pairs_scored": pairs, "pairs_saved": 0, "cancelled_requests": 0}  # noqa: E731
        return {"idle_s": idle, "waited": {"next_s": waited_next, "counts": counts(waited_pairs)}, "abandoned@100ms": {"next_s": ab_next, "counts": counts(ab_pairs)}}

    good = [rep(1.0, 9.0, 1.1, 850, 50 + 40), rep(1.0, 8.0, 1.2, 850, 50 + 10), rep(1.2, 9.5, 1.0, 850, 50)]
    summary, targets = verdicts(good, depth=50, pass_pairs=64)
    assert summary["waited"]["burst_pairs_scored"]["median"] == 800 and summary["abandoned@100ms"]["burst_pairs_scored"]["median"] == 10
    assert summary["waited"]["next_over_idle"] == pytest.approx(9.0) and [t["met"] for t in targets] == [True, True]
    bad = [rep(1.0, 9.0, 5.0, 850, 850)] * 3  # nothing dropped: the abandoned burst costs what the waited one does
    assert [t["met"] for t in verdicts(bad, depth=50, pass_pairs=64)[1]] == [False, False]


def test_the_closed_loop_keeps_every_client_busy_and_records_failures():
    """benchmarks.loadgen.run_closed_loop (closed_loop and the composite's peer loop use it):
    each item sent once, at most `concurrency` in flight, an exception recorded as a result."""
    import asyncio

    from benchmarks.loadgen import run_closed_loop

    in_flight, peak = 0, 0

    async def send(client, i, item):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        if item == "bad":
            raise RuntimeError("refused")
        return 200, {"item": item}, None

    items = ["a", "b", "bad", "c", "d", "e", "f"]
    res = asyncio.run(run_closed_loop(items, 3, send))
    assert [r.index for r in res.records] == list(range(len(items))) and peak == 3
    assert [r.info.get("item") for r in res.ok] == ["a", "b", "c", "d", "e", "f"]
    (failed,) = [r for r in res.records if r.status != 200]
    assert failed.index == 2 and failed.status == 0 and "RuntimeError: refused" in failed.error
