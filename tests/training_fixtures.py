"""A tiny BEIR-layout dataset for the training tests (topics spelled with the tiny models' vocabulary)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TOPICS = {
    "sport": "football soccer tennis match team player players goal season league cup game games".split(),
    "music": "music song album band guitar piano concert".split(),
    "space": "space star stars planet moon sun earth orbit rocket telescope galaxy".split(),
    "food": "food bread coffee tea wine cheese recipe cooking kitchen".split(),
    "health": "protein cell gene virus vaccine disease cancer tumor patients clinical trial".split(),
    "climate": "ocean sea river water climate weather rain snow temperature carbon energy".split(),
}


def write_tiny_beir(root: Path, *, docs_per_topic: int = 6, queries_per_topic: int = 4, seed: int = 0) -> Path:
    """Write corpus.jsonl, queries.jsonl and qrels/{train,test}.tsv under ``root``.

    Each query names two words of its topic; its positives are the two documents of that topic
    that contain both words (they are built to). Train and test get disjoint queries.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    docs, queries, qrels = [], [], []
    for t, (topic, words) in enumerate(TOPICS.items()):
        for i in range(docs_per_topic):
            picked = rng.choice(words, size=6, replace=True).tolist()
            docs.append({"_id": f"{topic}-d{i}", "title": topic, "text": " ".join(picked)})
        for j in range(queries_per_topic):
            a, b = rng.choice(words, size=2, replace=False).tolist()
            qid = f"{topic}-q{j}"
            queries.append({"_id": qid, "text": f"{a} {b}"})
            for k in range(2):
                d = (j * 2 + k) % docs_per_topic
                doc = docs[t * docs_per_topic + d]
                doc["text"] = f"{a} {b} {doc['text']}"
                qrels.append((qid, doc["_id"], 1))
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    header = "query-id\tcorpus-id\tscore\n"
    test_q = {q["_id"] for q in queries if q["_id"].endswith("-q0")}
    (root / "qrels" / "train.tsv").write_text(header + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels if q not in test_q))
    (root / "qrels" / "test.tsv").write_text(header + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels if q in test_q))
    return root
