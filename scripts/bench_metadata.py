"""Benchmark: a bulk metadata merge of 3 keys against a raw pymongo
``update_many`` ``$set`` of the same 3 paths on the same samples, in one run.

Usage::

    .venv/bin/python scripts/bench_metadata.py [--samples 100000] [--rounds 3] [--record]

Each round builds fresh datasets, and times, in alternating order:

-   ours: ``bulk_labeling.edit_metadata(dataset, {"camera": "A7",
    "site": {"row": 3}, "score": 0.5})``, everything included: validation,
    field declarations, targeting, the journal (capture of prior values, undo
    records) and the write;
-   raw: ``update_many({}, {"$set": {"custom_metadata.camera": "A7",
    "custom_metadata.site.row": 3, "custom_metadata.score": 0.5}})``, and the
    same with an ``{"_id": {"$in": ids}}`` filter (ids fetched beforehand,
    not timed). The requirement is checked against the faster of the two.

Informational rows: the raw ``$set`` plus ``$currentDate`` of
``last_modified_at`` (the bookkeeping every correct FiftyOne write pays, on
an indexed field), and a merge over samples that already hold all three keys,
so that the journal captures 100k prior values. CPU seconds (this process +
its mongod) are reported next to wall times: other work on a shared machine
disturbs them much less.

It runs against a mongod of its own, started on a temporary database dir
(FiftyOne would otherwise attach to any FiftyOne database service already
running on the machine, whatever FIFTYONE_DATABASE_DIR says), unless
BENCH_DATABASE_URI names a server. ``--record`` appends the table under
"## Metadata" in docs/BENCHMARKS.md.
"""

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time

REQUIRED = 1.5
PAYLOAD = {"camera": "A7", "site": {"row": 3}, "score": 0.5}
RAW_SET = {
    "custom_metadata.camera": "A7",
    "custom_metadata.site.row": 3,
    "custom_metadata.score": 0.5,
}


_MONGOD = {}


def _start_private_mongod():
    """Starts a mongod on a temporary dir and returns its URI (stopped at
    exit); its pid is kept so that its CPU time can be read."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import private_mongod

    dbpath = tempfile.mkdtemp(prefix="bulk_labeling_bench_metadata_")
    atexit.register(shutil.rmtree, dbpath, True)
    uri = private_mongod.start(dbpath)
    _MONGOD["pid"] = private_mongod.started[-1].pid
    return uri


# Isolation before fiftyone is imported
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
os.environ["FIFTYONE_DATABASE_DIR"] = tempfile.mkdtemp(prefix="bulk_labeling_bench_")
atexit.register(shutil.rmtree, os.environ["FIFTYONE_DATABASE_DIR"], True)
if not os.environ.get("BENCH_DATABASE_URI"):
    os.environ["BENCH_DATABASE_URI"] = _start_private_mongod()

sys.path.insert(0, os.path.dirname(__file__))
import _bench  # noqa: E402

import fiftyone as fo  # noqa: E402

import bulk_labeling as bl  # noqa: E402
from bulk_labeling.core import database as db  # noqa: E402


def _cpu():
    """CPU seconds used so far by this process and by the private mongod:
    a measure that the other work on a shared machine disturbs much less
    than wall time."""
    total = time.process_time()
    pid = _MONGOD.get("pid")
    if pid:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


class Timer(object):
    def __enter__(self):
        self.cpu0 = _cpu()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *args):
        self.wall = time.perf_counter() - self.t0
        self.cpu = _cpu() - self.cpu0


def fresh_dataset(count, with_values=False):
    dataset = fo.Dataset()
    _bench.insert_bare_samples(dataset, count)
    if with_values:
        db.sample_coll(dataset).update_many(
            {}, {"$set": {"custom_metadata": {"camera": "old", "site": {"row": 1},
                                              "score": 0.1}}}
        )
    _bench.settle()
    return dataset


def time_ours(count, with_values=False):
    dataset = fresh_dataset(count, with_values)
    with Timer() as t:
        result = bl.edit_metadata(dataset, PAYLOAD, progress=False)
    assert result["changed"] == count, result
    dataset.delete()
    return t


def time_raw(count, by_ids, with_values=False, last_modified=False):
    dataset = fresh_dataset(count, with_values)
    coll = db.sample_coll(dataset)
    query = {}
    if by_ids:
        query = {"_id": {"$in": [d["_id"] for d in coll.find({}, {"_id": 1})]}}
        _bench.settle()
    update = {"$set": RAW_SET}
    if last_modified:
        update["$currentDate"] = {"last_modified_at": True}
    with Timer() as t:
        res = coll.update_many(query, update)
    assert res.modified_count == count, res.modified_count
    dataset.delete()
    return t


RUNNERS = {
    "ours": lambda n, v: time_ours(n, v),
    "raw {}": lambda n, v: time_raw(n, False, v),
    "raw $in": lambda n, v: time_raw(n, True, v),
    "raw {} + last_modified_at": lambda n, v: time_raw(n, False, v, True),
}


def run_rounds(count, rounds, with_values, names):
    results = []
    for i in range(rounds):
        timings = {}
        order = names if i % 2 == 0 else list(reversed(names))
        for name in order:
            timings[name] = RUNNERS[name](count, with_values)
        results.append(timings)
        print("  round %d: %s" % (i + 1, ", ".join(
            "%s %.2f s (cpu %.2f)" % (k, timings[k].wall, timings[k].cpu)
            for k in names)), flush=True)
    return results


def _median(results, name, attr="wall"):
    return statistics.median(getattr(r[name], attr) for r in results)


def _raw(r, attr="wall"):
    return min(getattr(r["raw {}"], attr), getattr(r["raw $in"], attr))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-existing", action="store_true",
                        help="skip the informational merge over existing values")
    parser.add_argument("--record", action="store_true",
                        help="append the table to docs/BENCHMARKS.md")
    args = parser.parse_args()
    n = args.samples

    _bench.warm_up()
    load_start = os.getloadavg()[0]
    names = ["ours", "raw {}", "raw $in", "raw {} + last_modified_at"]
    print("Merge of 3 keys on %s fresh samples" % format(n, ","), flush=True)
    fresh = run_rounds(n, args.rounds, False, names)
    existing = None
    if not args.skip_existing:
        print("Merge of 3 keys over existing values (the journal captures "
              "every prior value)", flush=True)
        existing = run_rounds(n, args.rounds, True, ["ours", "raw {}", "raw $in"])
    load_end = os.getloadavg()[0]

    ratios = [r["ours"].wall / _raw(r) for r in fresh]
    cpu_ratios = [r["ours"].cpu / _raw(r, "cpu") for r in fresh]
    ratio = statistics.median(ratios)
    cpu_ratio = statistics.median(cpu_ratios)
    ours = _median(fresh, "ours")
    raw = statistics.median(_raw(r) for r in fresh)
    rows = [
        ("`edit_metadata` merge of 3 keys, fresh samples (journaled)", ours,
         "raw `update_many` `$set` of the same 3 paths", raw, REQUIRED),
        ("`edit_metadata` merge of 3 keys, fresh samples (journaled)", ours,
         "raw `update_many` `$set` of the same 3 paths + `last_modified_at` "
         "(FiftyOne's indexed bookkeeping, which every correct write pays)",
         _median(fresh, "raw {} + last_modified_at"), None),
    ]
    if existing:
        rows.append((
            "`edit_metadata` merge of 3 keys over existing values "
            "(journaled, %s prior values captured)" % format(n, ","),
            _median(existing, "ours"),
            "raw `update_many` `$set` of the same 3 paths",
            statistics.median(_raw(r) for r in existing), None,
        ))

    per_round = ", ".join(
        "%.2f/%.2f s" % (r["ours"].wall, _raw(r)) for r in fresh)
    cpu_round = ", ".join(
        "%.2f/%.2f s" % (r["ours"].cpu, _raw(r, "cpu")) for r in fresh)
    title = (
        "Metadata merge of 3 keys on %s samples (median of %d rounds; wall "
        "ours/raw per round: %s; CPU seconds of this process + its mongod, "
        "ours/raw: %s, median ratio %.2f×; raw = the faster of "
        "`update_many({})` and `update_many({_id: {$in: ids}})`; load "
        "average %.1f at start, %.1f at end)"
        % (format(n, ","), len(fresh), per_round, cpu_round, cpu_ratio,
           load_start, load_end)
    )
    table = _bench.format_table(
        title, rows,
        columns=("ours", "ours (s)", "baseline", "baseline (s)",
                 "ratio ours/baseline", "required"),
    )
    print()
    print(table)
    print("wall ratio (median of per-round ratios): %.2fx; CPU ratio %.2fx; "
          "required <= %.1fx: %s" % (ratio, cpu_ratio, REQUIRED,
                                      "OK" if ratio <= REQUIRED else "MISSED"))
    if args.record:
        _bench.record("Metadata", table)
        print("Appended to %s" % _bench.RESULTS)


if __name__ == "__main__":
    main()
