"""Benchmark: label_as and edit_metadata at 100k, 300k and 1,000,000 samples.

For each size, a fresh dataset of bare image samples is inserted
(``bulk_labeling.testing.insert_bare_samples``), then every measured operation
runs in a fresh Python process of its own, so that its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) is the operation's own and not left
over from the set-up or from an earlier operation:

-   ``label_as``: ``bl.label(dataset, add=["cat", "pet"])`` (journaled);
-   ``edit_metadata``: ``bl.edit_metadata(dataset, {...}, mode="merge")``
    (journaled, captures prior values for undo).

Reported per operation and size: seconds, microseconds per sample (flat when
time grows linearly), the process's peak RSS, and its RSS right before the
operation (after ``import fiftyone`` and loading the dataset): the
difference is what the operation itself holds at its peak. Required:
peak RSS under 1.5 GB, and time linear in the number of samples (per-sample
time at the largest size at most 1.5x the one at the smallest).

The database server (mongod) runs in a process of its own; its memory is
not part of the figures.

Usage::

    .venv/bin/python scripts/bench_scale.py [--sizes 100000,300000,1000000]
        [--ops label_as,edit_metadata] [--record]

``--record`` appends the table to docs/BENCHMARKS.md under "## Scale". Runs
in a database of its own (see scripts/_bench.py; ``BENCH_DATABASE_URI``
names an external MongoDB server to use instead).
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402  (sets up an isolated database before fiftyone)

REQUIRED_MAX_RSS_MB = 1500
REQUIRED_LINEARITY = 1.5
METADATA = {"source": "bench", "batch": 7,
            "camera": {"id": 3, "site": "north", "calibrated": True}}
OPS = ("label_as", "edit_metadata")


def run_child(op, dataset_name):
    """Measures one operation in this (fresh) process; prints one JSON line."""
    import resource

    import psutil

    import fiftyone as fo

    import bulk_labeling as bl

    dataset = fo.load_dataset(dataset_name)
    rss_before = psutil.Process().memory_info().rss / 2**20
    count = dataset.count()
    start = time.perf_counter()
    if op == "label_as":
        result = bl.label(dataset, add=["cat", "pet"], progress=False)
    elif op == "edit_metadata":
        result = bl.edit_metadata(dataset, METADATA, mode="merge",
                                  progress=False)
    else:
        raise ValueError("unknown operation %r" % op)
    seconds = time.perf_counter() - start
    assert result["matched"] == count, result
    assert result["changed"] == count, result
    print("BENCH_SCALE_RESULT " + json.dumps({
        "op": op,
        "samples": count,
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": rss_before,
    }), flush=True)


def measure(op, dataset_name, database_uri):
    env = dict(os.environ)
    # The child joins this process's database (its own _bench import would
    # otherwise start a fresh, empty one)
    env["BENCH_DATABASE_URI"] = database_uri
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", op,
         "--dataset", dataset_name],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_SCALE_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError("%s failed (exit %d):\n%s" % (
        op, proc.returncode, (proc.stdout + proc.stderr)[-3000:]))


def database_uri():
    if os.environ.get("FIFTYONE_DATABASE_URI"):
        return os.environ["FIFTYONE_DATABASE_URI"]
    from bulk_labeling.core import database as db

    host, port = db.get_db().client.address
    return "mongodb://%s:%d" % (host, port)


def linear_fit(points):
    """Least-squares ``seconds = a + b * samples``; returns (a, b, r2)."""
    n = len(points)
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 2 or sxx == 0:
        return my, 0.0, 1.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
    return a, b, (1 - ss_res / ss_tot) if ss_tot else 1.0


def format_table(results, sizes):
    lines = [
        "### label_as and edit_metadata at %s samples" % " / ".join(
            format(s, ",") for s in sizes),
        "",
        "%s; %s; each operation in a fresh process (peak RSS is its own; "
        "mongod not included)" % (time.strftime("%Y-%m-%d"), _bench.machine()),
        "",
        "| operation | samples | seconds | µs / sample | peak RSS (MB) | "
        "RSS before the operation (MB) | required |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for op in OPS:
        rows = [r for r in results if r["op"] == op]
        if not rows:
            continue
        for r in rows:
            ok = r["peak_rss_mb"] < REQUIRED_MAX_RSS_MB
            verdicts.append(ok)
            lines.append("| %s | %s | %.1f | %.1f | %.0f | %.0f | RSS < %d MB %s |" % (
                op, format(r["samples"], ","), r["seconds"],
                1e6 * r["seconds"] / r["samples"], r["peak_rss_mb"],
                r["rss_before_mb"], REQUIRED_MAX_RSS_MB, "✅" if ok else "❌"))
        if len(rows) >= 2:
            small, large = rows[0], rows[-1]
            growth = ((large["seconds"] / large["samples"])
                      / (small["seconds"] / small["samples"]))
            a, b, r2 = linear_fit([(r["samples"], r["seconds"]) for r in rows])
            ok = growth <= REQUIRED_LINEARITY
            verdicts.append(ok)
            lines.append(
                "| %s: linearity | %s→%s | fit %.1f s + %.1f µs × n (R² %.3f) "
                "| ×%.2f per sample | | | ≤ %.1f× %s |" % (
                    op, format(small["samples"], ","),
                    format(large["samples"], ","), a, b * 1e6, r2, growth,
                    REQUIRED_LINEARITY, "✅" if ok else "❌"))
    return "\n".join(lines) + "\n", all(verdicts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,300000,1000000",
                        help="comma-separated sample counts")
    parser.add_argument("--ops", default=",".join(OPS),
                        help="comma-separated: %s" % ", ".join(OPS))
    parser.add_argument("--record", action="store_true",
                        help="append the table to docs/BENCHMARKS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        run_child(args.child, args.dataset)
        return 0

    sizes = sorted(int(s.replace("_", "")) for s in args.sizes.split(",") if s)
    ops = [o for o in args.ops.split(",") if o]
    for op in ops:
        if op not in OPS:
            parser.error("unknown operation %r" % op)

    import fiftyone as fo

    uri = database_uri()
    results = []
    for size in sizes:
        dataset = fo.Dataset()
        dataset.persistent = True  # the children are other processes
        try:
            start = time.perf_counter()
            _bench.insert_bare_samples(dataset, size)
            print("inserted %s samples in %.1fs" % (
                format(size, ","), time.perf_counter() - start), flush=True)
            for op in ops:
                r = measure(op, dataset.name, uri)
                results.append(r)
                print("%s on %s: %.1fs (%.1f µs/sample), peak RSS %.0f MB" % (
                    op, format(size, ","), r["seconds"],
                    1e6 * r["seconds"] / r["samples"], r["peak_rss_mb"]),
                    flush=True)
        finally:
            dataset.delete()

    results.sort(key=lambda r: (OPS.index(r["op"]), r["samples"]))
    table, ok = format_table(results, sizes)
    print()
    print(table)
    if args.record:
        _bench.record("Scale", table)
        print("recorded in docs/BENCHMARKS.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
