#!/usr/bin/env python
"""Benchmark: smart-search query latency at 100,000 and 1,000,000 vectors.

For each size, in a process of its own (so each size's peak RSS is its own):
N bare samples are inserted with raw ``insert_many``, N synthetic 512-d
float32 vectors are put in a default sklearn similarity index
(``compute_similarity(embeddings=..., backend="sklearn")``), and the same
query vectors are answered with k=100 by:

-   **ours**: :func:`bulk_labeling.core.similarity.rank` +
    :func:`~bulk_labeling.core.similarity.result_view` (the query path of
    ``find_similar``: one matrix-vector product on the per-process
    normalised copy, top-k, existence check of the hits in MongoDB, and the
    ranked view with its computed scores);
-   **FiftyOne**: ``index.sort_by_similarity(vector, k=100)`` on the same
    index.

Both are timed to the view object, and to the view's 100 ids fetched from
MongoDB (what the App's grid needs). Medians over ``--queries`` queries; the
first brain query (which fits sklearn's NearestNeighbors) is reported apart.
With ``--persisted`` (sizes <= 200k), the index is also saved the way
``build_similarity_index`` saves it and ``search()`` is timed end to end
(index state check, loading on first use).

``--record`` appends the table to ``docs/BENCHMARKS.md`` under
"## Query latency".

Usage::

    .venv/bin/python scripts/bench_query.py [--sizes 100000 1000000] [--queries 20] [--record]
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DIMS = 512
K = 100


def child(n, queries, persisted):
    sys.path.insert(0, HERE)
    import _bench  # noqa: F401  (isolated database; must precede fiftyone)

    import numpy as np

    import fiftyone as fo
    import fiftyone.brain as fob

    from bulk_labeling.core import similarity as sim
    from bulk_labeling.testing import insert_bare_samples

    out = {"n": n}
    t = time.perf_counter()
    dataset = fo.Dataset()
    insert_bare_samples(dataset, n)
    out["insert_s"] = time.perf_counter() - t

    rng = np.random.default_rng(0)
    vectors = np.empty((n, DIMS), dtype=np.float32)
    for i in range(0, n, 100_000):
        vectors[i:i + 100_000] = rng.standard_normal((min(100_000, n - i), DIMS),
                                                     dtype=np.float32)
    qs = rng.standard_normal((queries + 1, DIMS), dtype=np.float32)

    t = time.perf_counter()
    index = fob.compute_similarity(dataset, embeddings=vectors, backend="sklearn",
                                   progress=False)
    out["brain_index_s"] = time.perf_counter() - t
    del vectors

    t = time.perf_counter()
    qindex = sim.QueryIndex.from_results(index, brain_key="bench")
    out["our_prepare_s"] = time.perf_counter() - t

    def ours(q, fetch):
        ids, scores, _ = sim.rank(qindex, dataset, q, k=K)
        view = sim.result_view(dataset, ids, scores)
        if fetch:
            got = view.values("id")
            assert got == ids, "view order differs from the ranking"
        return ids

    def brain(q, fetch):
        view = index.sort_by_similarity(q, k=K)
        return view.values("id") if fetch else view

    t = time.perf_counter()
    brain(qs[0], False)
    out["brain_first_query_s"] = time.perf_counter() - t
    ours(qs[0], False)

    times = {"ours_view": [], "ours_fetch": [], "brain_view": [], "brain_fetch": []}
    overlap = []
    for q in qs[1:]:
        for fetch in (False, True):
            t = time.perf_counter()
            a = ours(q, fetch)
            times["ours_fetch" if fetch else "ours_view"].append(time.perf_counter() - t)
            t = time.perf_counter()
            b = brain(q, fetch)
            times["brain_fetch" if fetch else "brain_view"].append(time.perf_counter() - t)
            if fetch:
                overlap.append(len(set(a) & set(b)) / K)
    for key, values in times.items():
        out[key + "_ms"] = 1000 * statistics.median(values)
    out["top100_overlap"] = statistics.mean(overlap)

    if persisted:
        key = sim.DEFAULT_BRAIN_KEY
        ids = [str(i) for i in index.sample_ids]
        emb = index.embeddings
        t = time.perf_counter()
        stored = fob.compute_similarity(dataset, embeddings=False, brain_key=key,
                                        backend="sklearn")
        stored.add_to_index(sim._to_store(emb, "sklearn"), np.array(ids), reload=False)
        stored.save()
        out["persist_save_s"] = time.perf_counter() - t
        del stored, emb
        sim._invalidate(dataset, key)
        t = time.perf_counter()
        sim.search(dataset, ids=[ids[0]], k=K)
        out["search_first_s"] = time.perf_counter() - t
        search_times = []
        for i in range(1, queries + 1):
            t = time.perf_counter()
            res = sim.search(dataset, ids=[ids[i]], k=K)
            search_times.append(time.perf_counter() - t)
            res["view"].values("id")
        out["search_ms"] = 1000 * statistics.median(search_times)

    out["peak_rss_mb"] = _bench.peak_rss_mb()
    dataset.delete()
    print("RESULT " + json.dumps(out), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--persisted", action="store_true",
                        help="also time search() on a saved index (sizes <= 200k)")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        child(args.child, args.queries, args.persisted and args.child <= 200_000)
        return

    sys.path.insert(0, HERE)
    import _bench

    results = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(n), "--queries", str(args.queries)]
        if args.persisted:
            cmd.append("--persisted")
        print("$ " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit("size %d failed" % n)
        res = json.loads(lines[-1][7:])
        print(json.dumps(res, indent=1), flush=True)
        results.append(res)

    lines = [
        "### k=%d over synthetic %d-d vectors, default sklearn index" % (K, DIMS),
        "",
        "%s; %s; no GPU; median of %d queries per size, each size in its own "
        "process" % (datetime.date.today().isoformat(), _bench.machine(), args.queries),
        "",
        "| vectors | ours: ranked view | FiftyOne sort_by_similarity: view | "
        "ours: + fetch 100 ids | FiftyOne: + fetch | speed-up (fetch) | "
        "FiftyOne 1st query (NN fit) | top-100 overlap | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            "| {n:,} | {ours_view_ms:.1f} ms | {brain_view_ms:.1f} ms | "
            "{ours_fetch_ms:.1f} ms | {brain_fetch_ms:.1f} ms | {ratio:.1f}× | "
            "{brain_first_query_s:.2f} s | {top100_overlap:.2f} | "
            "{peak_rss_mb:,.0f} MB |".format(
                ratio=r["brain_fetch_ms"] / r["ours_fetch_ms"], **r)
        )
    persisted = [r for r in results if "search_ms" in r]
    if persisted:
        lines += ["", "End to end `search()` on a saved index (state check, "
                      "query by sample id, ranked view; first call loads the index):", ""]
        for r in persisted:
            lines.append(
                "* {n:,} vectors: save {persist_save_s:.1f} s, first search "
                "{search_first_s:.1f} s, then median {search_ms:.1f} ms".format(**r))
    lines += [
        "",
        "Top-100 overlap < 1 is expected: FiftyOne's sklearn backend centres "
        "the index vectors (not the query) before its cosine search; ours is "
        "plain cosine similarity, the score shown to users.",
        "",
    ]
    table = "\n".join(lines)
    print()
    print(table)
    if args.record:
        _bench.record("Query latency", table)
        print("recorded in docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
