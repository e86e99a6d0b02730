"""Abandoned /search requests against the same requests waited for: the work the service still
does for clients that hung up, and the latency of the request that comes next.

Command::

    python -m benchmarks.cancellation --repeats 3

The served application: the SciFact index (BM25 + dense, hybrid top-100 per retriever), the
speed model (a cross-encoder with MiniLM-L6's shape and cost, random weights) at max_length
256 reranking the fused top ``--depth``, one reranker replica with 2 CPUs, no score cache.

Each repeat runs three phases, in this order, with the reranker idle at the start of each:

1. **idle**: one request alone, timed (what an idle server answers in);
2. **waited**: a burst of ``--burst`` concurrent /search requests whose clients wait for their
   answers; ``--next-after-ms`` after the burst starts, one more request is sent and timed;
3. **abandoned**, once per ``--hangup-ms`` value: the same burst, each client hanging up after
   that long (its connection is closed: Serve's proxy cancels the request, and with it the
   handle calls it made); the next request is sent 50 ms after the hang-ups and timed. At
   100 ms the burst is still in the retrievers; at 2,000 ms it waits at (or is in) the reranker.

The reranker replica's own counters (its ``stats``, read through a Serve handle before and
after each phase) give the pairs it scored and the pairs it dropped. The pairs scored for the
burst are the phase's pairs minus the next request's ``--depth``.

In the waited burst the next request is sent ``--next-after-ms`` after the burst starts.

Targets: the burst abandoned at the first hang-up time scores no more pairs than one forward
pass holds (a pass already running when the hang-ups arrive; max_batch_tokens over max_length),
and after every abandoned burst the next request's latency is that of an idle server (within
1.25x the idle request's, medians over the repeats). A burst abandoned later had pairs scored
before its hang-ups; what it saved is the rest (``pairs dropped unscored``).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Sequence

import httpx
import numpy as np

from benchmarks.common import DEFAULT_CACHE, BenchRun, base_parser, ensure_scifact_index, fmt_spread, load_scifact, md_table, speed_model_dir, summarize, target_line
from benchmarks.loadgen import check_loopback
from benchmarks.serving import handle_call, serve_stack

RERANKER = "CrossEncoderReranker"


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any], timeout_s: float) -> tuple[str, float]:
    t0 = time.perf_counter()
    try:
        r = await client.post(url, json=body, timeout=timeout_s)
        return str(r.status_code), time.perf_counter() - t0
    except httpx.TimeoutException:
        return "hung up", time.perf_counter() - t0


async def burst(url: str, bodies: Sequence[dict[str, Any]], next_body: dict[str, Any], *, hangup_s: float | None, next_after_s: float, timeout_s: float = 600.0) -> dict[str, Any]:
    """Send ``bodies`` at once (each on its own connection, closed after ``hangup_s`` when set),
    then ``next_body`` ``next_after_s`` later; the statuses of the burst and the next request's
    latency (seconds)."""
    check_loopback(url)
    limits = httpx.Limits(max_connections=len(bodies) + 1, max_keepalive_connections=0)  # a hang-up closes its connection
    async with httpx.AsyncClient(limits=limits) as client:
        tasks = [asyncio.create_task(_one(client, url, b, hangup_s if hangup_s is not None else timeout_s)) for b in bodies]
        await asyncio.sleep(next_after_s)
        status, next_s = await _one(client, url, next_body, timeout_s)
        done = await asyncio.gather(*tasks)
    statuses: dict[str, int] = {}
    for s, _ in done:
        statuses[s] = statuses.get(s, 0) + 1
    return {"burst_statuses": statuses, "next_status": status, "next_s": next_s}


def reranker_counts() -> dict[str, int]:
    s = handle_call(RERANKER, "stats")
    return {"pairs_scored": int(s["pairs_scored"]), "cancelled_requests": int(s["cancelled"]["requests"]), "pairs_saved": int(s["cancelled"]["pairs_saved"])}


def wait_idle(quiet_s: float = 1.5, timeout_s: float = 600.0) -> dict[str, int]:
    """The reranker's counters once its pairs_scored has not moved for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    last = reranker_counts()
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = reranker_counts()
        if now["pairs_scored"] != last["pairs_scored"]:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return now
    raise SystemExit("the reranker did not go idle")


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def verdicts(repeats: Sequence[dict[str, Any]], depth: int, pass_pairs: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Medians over the repeats and the target lines (pure: tested without a server). The modes
    are ``waited`` and ``abandoned`` or ``abandoned@<ms>`` (the first abandoned one gets the
    pairs target)."""
    idle = float(np.median([r["idle_s"] for r in repeats]))
    summary: dict[str, Any] = {"idle_ms": summarize([1000 * r["idle_s"] for r in repeats])}
    modes = [k for k in repeats[0] if k == "waited" or k.startswith("abandoned")]
    for mode in modes:
        rows = [r[mode] for r in repeats]
        summary[mode] = {
            "next_ms": summarize([1000 * x["next_s"] for x in rows]),
            "next_over_idle": float(np.median([x["next_s"] for x in rows])) / idle,
            "burst_pairs_scored": summarize([max(0, x["counts"]["pairs_scored"] - depth) for x in rows]),
            "pairs_saved": summarize([x["counts"]["pairs_saved"] for x in rows]),
            "cancelled_requests": summarize([x["counts"]["cancelled_requests"] for x in rows]),
        }
    abandoned = [m for m in modes if m.startswith("abandoned")]
    first = summary[abandoned[0]]
    targets = [target_line(f"pairs scored for the burst {abandoned[0]}: at most one forward pass ({pass_pairs} pairs) already running at the hang-ups (median over repeats; pairs)", first["burst_pairs_scored"]["median"], float(pass_pairs), unit="", higher_is_better=False)]
    for m in abandoned:
        targets.append(target_line(f"the next request's latency after the burst {m}, over an idle server's (medians)", summary[m]["next_over_idle"], 1.25, unit="x", higher_is_better=False))
    return summary, targets


def main(argv: Sequence[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--scifact", default=None, help="SciFact BEIR directory")
    p.add_argument("--index", default=str(DEFAULT_CACHE / "bench" / "scifact-index"), help="index directory (built if missing)")
    p.add_argument("--model", default=None, help="reranker (default: the speed model, $BENCH_CACHE/minilm-ce)")
    p.add_argument("--burst", type=int, default=16, help="concurrent requests per burst")
    p.add_argument("--depth", type=int, default=50, help="rerank_top_m of every request")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--hangup-ms", type=float, nargs="+", default=[100.0, 2000.0], help="abandoned clients close their connection after this (one abandoned burst per value)")
    p.add_argument("--next-after-ms", type=float, default=150.0, help="the next request is sent this long after the burst starts")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="reranker.max_batch_tokens (a forward pass's token budget)")
    args = p.parse_args(argv)
    run = BenchRun("cancellation", args, args.out)
    index = ensure_scifact_index(Path(args.index), args.scifact)
    model = Path(args.model) if args.model else speed_model_dir()
    pass_pairs = min(256, args.max_batch_tokens // args.max_length)
    ds = load_scifact(args.scifact)
    queries = [ds.queries[q] for q in sorted(ds.queries)]

    app_args = {
        "index_dir": str(index),
        "build_index_if_missing": False,
        "retrievers": ["bm25", "dense"],
        "reranker": {"model": str(model), "max_length": args.max_length, "device": "cpu", "max_batch_tokens": args.max_batch_tokens, "score_cache": {"max_bytes": 0}},
        "funnel": {"default_rerank_top_m": args.depth},
        "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.01},
        "timeouts": {"retriever_timeout_s": 120, "rerank_timeout_s": 300, "request_timeout_s": 300},
    }
    deployments = {
        "SearchIngress": {"num_replicas": 1, "max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0.25}},
        "BM25Retriever": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
        "DenseRetriever": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
        RERANKER: {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 2.0, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}}}},
    }
    repeats: list[dict[str, Any]] = []
    with serve_stack(app_args, deployments, num_cpus=4.0, timeout_s=900) as base:
        url = base + "/search"
        q = iter(queries * 10)

        def body() -> dict[str, Any]:
            return {"query": next(q), "top_k": 100, "top_n": 10}

        asyncio.run(burst(url, [body() for _ in range(2)], body(), hangup_s=None, next_after_s=0.0))  # warm-up
        for rep in range(args.repeats):
            out: dict[str, Any] = {}
            wait_idle()
            t0 = time.perf_counter()
            asyncio.run(burst(url, [], body(), hangup_s=None, next_after_s=0.0))
            out["idle_s"] = time.perf_counter() - t0
            for mode, hangup in (("waited", None), *((f"abandoned@{ms:g}ms", ms / 1000) for ms in args.hangup_ms)):
                bodies = [body() for _ in range(args.burst)]
                before = wait_idle()
                res = burst(url, bodies, body(), hangup_s=hangup, next_after_s=args.next_after_ms / 1000 if hangup is None else hangup + 0.05)
                res = asyncio.run(res)
                res["counts"] = delta(wait_idle(), before)
                out[mode] = res
                print(f"repeat {rep + 1} {mode}: burst {res['burst_statuses']}, next {res['next_status']} in {1000 * res['next_s']:.0f} ms, reranker {res['counts']}")
            print(f"repeat {rep + 1} idle: {1000 * out['idle_s']:.0f} ms")
            repeats.append(out)

    summary, targets = verdicts(repeats, args.depth, pass_pairs)
    results = {"repeats": repeats, "summary": summary, "pass_pairs": pass_pairs}
    md = run.header_markdown("Abandoned requests: work the service still does, and the next request's latency")
    md += (
        f"/search on SciFact test queries (hybrid top-100), the speed model `{model.name}` (MiniLM-L6-shaped cross-encoder, random weights) at max_length {args.max_length} reranking the fused top {args.depth}, "
        f"one reranker replica with 2 CPUs, no score cache. Per repeat: an idle request; a burst of {args.burst} concurrent requests waited for; the same burst with every client hanging up after {', then after '.join(f'{ms:g} ms' for ms in args.hangup_ms)}. "
        f"One more request is timed, sent {args.next_after_ms:.0f} ms after the waited burst starts and 50 ms after the hang-ups. Pairs from the reranker replica's counters (the next request's {args.depth} subtracted). "
        f"A forward pass holds at most {pass_pairs} pairs (max_batch_tokens {args.max_batch_tokens} / {args.max_length}). Median [min-max] over {args.repeats} repeats, the phases interleaved in each (idle, waited, then each hang-up time).\n\n"
    )
    rows = [("idle", "", fmt_spread(summary["idle_ms"], 0), "1.00x", "", "", "")]
    for mode in [k for k in summary if k != "idle_ms"]:
        s = summary[mode]
        rows.append((mode, args.burst, fmt_spread(s["next_ms"], 0), f"{s['next_over_idle']:.2f}x", fmt_spread(s["burst_pairs_scored"], 0), fmt_spread(s["pairs_saved"], 0), fmt_spread(s["cancelled_requests"], 0)))
    md += md_table(["burst", "requests", "next request ms", "next / idle", "pairs scored for the burst", "pairs dropped unscored", "cancelled at the reranker"], rows)
    run.write(results, md, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
