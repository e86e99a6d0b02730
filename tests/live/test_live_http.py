"""Live writes through the HTTP API, in process (the real servers and app, no Ray): the routes,
visibility, wait_for, all-or-nothing batches across shards, replicas that start later, bad input."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.live.conftest import build, docs
from tests.live.stack import live_stack, until_ready


def run(coro):
    return asyncio.run(coro)


def ids_of(answer) -> list[str]:
    return [r["id"] for r in answer["results"]]


def test_write_search_delete_get_round_trip(index_dir, tiny_dense):
    async def main():
        async with live_stack(index_dir, tiny_dense) as (c, ns):
            await until_ready(c)
            r = await c.post("/documents", json={"documents": [{"id": "x1", "text": "quasar galaxy telescope", "title": "Astro", "metadata": {"year": 2024}}], "refresh": "wait_for"})
            body = r.json()
            timings = body.pop("timings_ms")
            assert r.status_code == 200 and body == {"seq": 1, "upserted": ["x1"], "refresh": "wait_for", "visible": True}
            assert set(timings) == {"durable", "visible"} and timings["durable"] > 0 and timings["visible"] >= 0
            s = (await c.post("/search", json={"query": "quasar telescope", "rerank_top_m": 0, "return_documents": True, "top_k": 60, "top_n": 60})).json()
            x1 = next(r for r in s["results"] if r["id"] == "x1")
            assert s["seq"] == 1 and x1["metadata"] == {"year": 2024} and x1["retrievers"]["bm25"]["rank"] == 1
            assert set(x1["retrievers"]) == {"bm25", "dense"}  # the dense retriever has its vector too
            # a replaced document: searches score and return the new text
            r = await c.post("/documents", json={"documents": [{"id": "x1", "text": "replaced words entirely"}], "refresh": "wait_for"})
            s = (await c.post("/search", json={"query": "replaced words", "rerank_top_m": 0, "return_documents": True, "retrievers": ["bm25"]})).json()
            assert s["results"][0]["id"] == "x1" and s["results"][0]["text"] == "replaced words entirely"
            assert "x1" not in ids_of((await c.post("/search", json={"query": "quasar telescope", "rerank_top_m": 0, "retrievers": ["bm25"]})).json())
            assert (await c.get("/documents/x1")).json() == {"id": "x1", "title": "", "text": "replaced words entirely", "metadata": {}}
            r = await c.request("DELETE", "/documents", json={"ids": ["x1", "doc002", "nope"], "refresh": "wait_for"})
            assert {k: v for k, v in r.json().items() if k != "timings_ms"} == {"seq": 3, "deleted": ["x1", "doc002"], "absent": ["nope"], "refresh": "wait_for", "visible": True}
            gone = await c.get("/documents/x1")
            assert gone.status_code == 404 and gone.json()["error"]["type"] == "document_not_found"
            s = (await c.post("/search", json={"query": "replaced words study", "rerank_top_m": 0, "top_k": 100})).json()
            assert "x1" not in ids_of(s) and "doc002" not in ids_of(s)
            r = await c.request("DELETE", "/documents", json={"ids": ["nope"]})
            assert {k: v for k, v in r.json().items() if k != "timings_ms"} == {"seq": None, "deleted": [], "absent": ["nope"], "refresh": "false"}
            info = (await c.get("/info")).json()
            assert info["index"]["documents"] == 59 and info["writes"]["live"]["applied_seq"] == 3
            h = (await c.get("/healthz")).json()
            assert h["stages"]["writer"] == "ok" and h["stages"]["documents"] == "ok"

    run(main())


def test_a_write_is_searchable_within_the_refresh_interval_without_wait_for(index_dir, tiny_dense):
    async def main():
        async with live_stack(index_dir, tiny_dense, refresh_interval_s=1.0) as (c, ns):
            await until_ready(c)
            for i in range(5):
                t0 = time.perf_counter()
                r = await c.post("/documents", json={"documents": [{"id": f"v{i}", "text": f"unicorn{i} appears"}]})
                assert r.json()["seq"] == i + 1 and "visible" not in r.json()
                while f"v{i}" not in ids_of((await c.post("/search", json={"query": f"unicorn{i}", "rerank_top_m": 0, "retrievers": ["bm25"]})).json()):
                    assert time.perf_counter() - t0 < 1.0, "not visible within refresh_interval_s"
                    await asyncio.sleep(0.005)

    run(main())


@pytest.mark.parametrize("body, status, kind", [
    ({"documents": []}, 422, "validation_error"),
    ({"documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, 422, "validation_error"),
    ({"documents": [{"id": "a", "text": "   "}]}, 422, "validation_error"),
    ({"documents": [{"id": "a", "text": ""}]}, 422, "validation_error"),
    ({"documents": [{"id": "a", "text": "x" * 201}]}, 422, "validation_error"),
    ({"documents": [{"id": "a" * 600, "text": "x"}]}, 422, "validation_error"),
    ({"documents": [{"id": "a", "text": "x", "metadata": [1]}]}, 422, "validation_error"),
    ({"documents": [{"id": "a", "text": "x", "metadata": {"k": "v" * 300}}]}, 422, "validation_error"),
    ({"documents": [{"id": str(i), "text": "x"} for i in range(11)]}, 422, "validation_error"),
    ({"documents": [{"id": "a", "text": "x", "extra": 1}]}, 422, "validation_error"),
    ({"documents": [{"id": 5, "text": "x"}]}, 422, "validation_error"),
    ({"documents": [{"id": "a", "text": "x"}], "refresh": "true"}, 422, "validation_error"),
    ({"ids": ["a"]}, 422, "validation_error"),
    ("not json", 400, "invalid_json"),
])
def test_bad_writes_get_a_clear_4xx_and_nothing_is_applied(index_dir, tiny_dense, body, status, kind):
    async def main():
        async with live_stack(index_dir, tiny_dense, max_batch_documents=10, max_document_chars=200, max_metadata_bytes=100) as (c, ns):
            if isinstance(body, str):
                r = await c.post("/documents", content=body, headers={"Content-Type": "application/json"})
            else:
                r = await c.post("/documents", json=body)
            assert r.status_code == status and r.json()["error"]["type"] == kind, r.text
            assert ns.writer.writer.last_seq == 0
            r = await c.request("DELETE", "/documents", json={"ids": ["a", "a"]})
            assert r.status_code == 422 and "repeated" in r.json()["error"]["message"]
            r = await c.request("DELETE", "/documents", json={"ids": []})
            assert r.status_code == 422
            r = await c.post("/documents", content=b'{"documents": [{"id": "a", "text": "x"}]}', headers={"Content-Type": "text/plain"})
            assert r.status_code == 415
            assert ns.writer.writer.last_seq == 0

    run(main())


def test_writes_need_the_api_key(index_dir, tiny_dense):
    async def main():
        async with live_stack(index_dir, tiny_dense, api_keys=["s3cret"]) as (c, ns):
            r = await c.post("/documents", json={"documents": [{"id": "a", "text": "x"}]})
            assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
            assert (await c.get("/documents/doc001")).status_code == 401
            r = await c.post("/documents", json={"documents": [{"id": "a", "text": "x"}]}, headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200 and ns.writer.writer.last_seq == 1

    run(main())


def test_without_writes_enabled_there_are_no_document_routes():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
    from serve_fakes import asgi_request, service_app

    app, _, _ = service_app(api_keys=[])
    r = asgi_request(app, "POST", "/documents", json={"documents": [{"id": "a", "text": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"


def test_a_search_sees_a_batch_entirely_or_not_at_all_across_shards(tmp_path, tiny_dense, tiny_encoder):
    """Each batch writes two documents that share a unique word and land in different shards;
    searches racing the writes find both or neither, never one."""
    from serve_app.live.changes import owner_shard

    idx = build(tmp_path / "idx", docs(40), tiny_dense, tiny_encoder, shards={"bm25": 2, "dense": 2})
    candidates = [f"pair-{i}" for i in range(200)]
    by_shard = [[c for c in candidates if owner_shard(c, None, 2) == s] for s in (0, 1)]
    pairs = list(zip(by_shard[0], by_shard[1]))[:25]
    assert len(pairs) == 25

    async def main():
        async with live_stack(idx, tiny_dense, shards={"bm25": 2, "dense": 2}, refresh_interval_s=0.5) as (c, ns):
            await until_ready(c)
            view = ns.bm25[1].live.view
            applied = view.apply

            def slow_apply(batch):  # one shard applies each batch 50 ms after the other
                time.sleep(0.05)
                applied(batch)

            view.apply = slow_apply
            seen: list[tuple[int, int]] = []
            done = asyncio.Event()

            async def writes():
                for n, (a, b) in enumerate(pairs):
                    await c.post("/documents", json={"documents": [{"id": a, "text": f"token{n} alpha"}, {"id": b, "text": f"token{n} beta"}]})
                    await asyncio.sleep(0.01)
                done.set()

            async def searches():
                while not done.is_set():
                    for n in range(len(pairs)):
                        ans = (await c.post("/search", json={"query": f"token{n}", "rerank_top_m": 0, "retrievers": ["bm25"], "top_k": 10})).json()
                        seen.append((n, sum(r["id"] in pairs[n] for r in ans["results"])))

            await asyncio.gather(writes(), searches(), searches())
            counts = {k for _, k in seen}
            assert counts <= {0, 2}, f"a search saw half a batch: {[s for s in seen if s[1] == 1][:5]}"
            assert 2 in counts and len(seen) > 50

    run(main())


def test_a_search_pinned_below_a_merge_reads_the_old_view_on_a_replica_that_swapped(tmp_path, tiny_dense, tiny_encoder):
    """The regression behind a search seeing half a batch across shards: after a merge at batch
    S, a replica that swapped in the new base clamped a search pinned below S (the batch every
    replica has applied) to S, while a shard not yet past S showed the older state. The swapped
    replica must answer such a search from its view before the swap."""
    from serve_app.live.changes import owner_shard

    idx = build(tmp_path / "idx", docs(40), tiny_dense, tiny_encoder, shards={"bm25": 2, "dense": 2})
    late = next(f"late-{i}" for i in range(100) if owner_shard(f"late-{i}", None, 2) == 0)

    async def main():
        async with live_stack(idx, tiny_dense, shards={"bm25": 2, "dense": 2}, auto_merge=False, follower_timeout_s=120) as (c, ns):
            await until_ready(c)
            r = await c.post("/documents", json={"documents": [{"id": "early", "text": "walrus tusk"}], "refresh": "wait_for"})
            assert r.json()["seq"] == 1
            stalled = ns.bm25[1].live
            await stalled.stop()  # shard 1 stops following at batch 1 (still counted live: it holds visibility back)
            r = await c.post("/documents", json={"documents": [{"id": late, "text": "walrus arctic"}]})
            assert r.json()["seq"] == 2
            report = await ns.writer.merge()
            assert report["base_seq"] == 2
            swapped = ns.bm25[0].live
            deadline = time.monotonic() + 30
            while swapped.view.base_seq != 2:
                assert time.monotonic() < deadline, "shard 0 never swapped in the merged base"
                await asyncio.sleep(0.05)
            assert swapped.follower.visible_seq == 1  # shard 1 is still at batch 1: searches pin 1
            before = [h.doc_id for h in await ns.bm25[0].search("walrus", 10, 1)]
            after = [h.doc_id for h in await ns.bm25[0].search("walrus", 10, 2)]
            assert late not in before, "a search pinned at batch 1 saw batch 2 on the replica that swapped"
            assert late in after
            ans = (await c.post("/search", json={"query": "walrus", "rerank_top_m": 0, "retrievers": ["bm25"]})).json()
            assert ans["seq"] == 1 and {h["id"] for h in ans["results"]} == {"early"}

    run(main())


def test_a_replica_started_after_writes_catches_up_before_it_is_ready(index_dir, tiny_dense):
    from serve_app.serve.config import BM25ServerConfig
    from serve_app.serve.retrievers import BM25Server

    async def main():
        async with live_stack(index_dir, tiny_dense) as (c, ns):
            await until_ready(c)
            for i in range(5):
                await c.post("/documents", json={"documents": [{"id": f"late{i}", "text": f"zebra{i} stripes"}]})
            await c.request("DELETE", "/documents", json={"ids": ["doc001"]})
            late = BM25Server(BM25ServerConfig(index_dir=str(index_dir), writes=ns.wcfg), ns.source)  # a new replica (autoscaling, restart)
            hits = await late.search("zebra3 stripes", 5)  # waits until it has followed the log
            assert hits[0].doc_id == "late3"
            assert late.live.follower.applied_seq == 6 and late.live.ready
            assert (await late.ping())["writes"]["applied_seq"] == 6
            assert "doc001" not in [h.doc_id for h in await late.search("ocean sea river study 1", 60)]
            await late.live.stop()

    run(main())


def test_concurrent_writes_and_searches_never_5xx(index_dir, tiny_dense):
    async def main():
        async with live_stack(index_dir, tiny_dense, refresh_interval_s=0.2) as (c, ns):
            await until_ready(c)
            statuses: list[int] = []

            async def writer(w: int):
                for i in range(15):
                    r = await c.post("/documents", json={"documents": [{"id": f"w{w}-{i % 5}", "text": f"load {i} ocean protein"}]})
                    statuses.append(r.status_code)
                    if i % 4 == 3:
                        statuses.append((await c.request("DELETE", "/documents", json={"ids": [f"w{w}-{i % 5}"]})).status_code)

            async def searcher():
                for i in range(40):
                    statuses.append((await c.post("/search", json={"query": "ocean protein load", "rerank_top_m": 5})).status_code)

            await asyncio.gather(*(writer(w) for w in range(3)), *(searcher() for _ in range(3)))
            assert statuses and set(statuses) == {200}

    run(main())


def test_deletes_past_the_threshold_merge_and_every_replica_moves_to_the_new_base(index_dir, tiny_dense):
    """The regression of deletes that never trigger a merge: 5 % of the base deleted passes
    merge_deleted_fraction, the writer merges in the background while writes go on, and every
    replica loads the merged base, catches it up and keeps answering exactly."""
    from serve_app.index import read_manifest
    from serve_app.retrieval.bm25 import BM25Retriever

    async def main():
        async with live_stack(index_dir, tiny_dense, merge_deleted_fraction=0.05) as (c, ns):
            await until_ready(c)
            replicas = [ns.live, *(s.live for s in ns.bm25 + ns.dense)]
            before = {r.generation for r in replicas}
            await c.post("/documents", json={"documents": [{"id": "keep", "text": "narwhal tusk"}], "refresh": "wait_for"})
            await c.request("DELETE", "/documents", json={"ids": ["doc001", "doc002"], "refresh": "wait_for"})
            assert ns.writer.last_merge is None  # 2 of 60: below the threshold
            await c.request("DELETE", "/documents", json={"ids": ["doc003"], "refresh": "wait_for"})  # 3 of 60 = 5 %
            deadline = time.monotonic() + 30
            while ns.writer.last_merge is None:
                assert time.monotonic() < deadline, "no merge after passing merge_deleted_fraction"
                await asyncio.sleep(0.05)
            merged = read_manifest(index_dir).writes
            assert merged["base_seq"] == 3 and ns.writer.writer.base_seq == 3
            await c.post("/documents", json={"documents": [{"id": "after", "text": "narwhal after the merge"}], "refresh": "wait_for"})
            while {r.generation for r in replicas} != {merged["generation"]}:
                assert time.monotonic() < deadline, f"replicas still on {[r.generation for r in replicas]}"
                await asyncio.sleep(0.05)
            assert before != {merged["generation"]}
            got = (await c.post("/search", json={"query": "narwhal", "rerank_top_m": 0, "retrievers": ["bm25"]})).json()
            assert set(ids_of(got)) == {"keep", "after"}
            from serve_app.live.merge import live_documents

            final, _ = live_documents(ns.writer.writer, ns.writer.writer.last_seq)
            fresh = BM25Retriever.build(final)
            for q in ("ocean sea river study", "protein gene", "narwhal tusk"):
                assert ns.bm25[0].live.view.search(q, 30) == fresh.search(q, 30)
            assert (await c.get("/info")).json()["index"]["documents"] == 59

    run(main())
