"""Benchmark: "Label as..." on N samples against FiftyOne's own ways to write
the same labels, in one run, with the journal's overhead broken out.

Usage::

    .venv/bin/python scripts/bench_label.py [--samples 100000] [--rounds 3] [--record]

Ours and the unjournaled baseline run the same batches on the same writer
threads (``bulk_labeling.core.database.write_workers()``, or
``BULK_LABELING_WRITE_WORKERS``); the journaling overhead is also measured
with one writer. Prints one table; ``--record`` appends it to
docs/BENCHMARKS.md. Runs in a database of its own, never the user's.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _bench  # noqa: E402  (sets up an isolated database before fiftyone)

import fiftyone as fo  # noqa: E402

import bulk_labeling as bl  # noqa: E402
from bulk_labeling.core import database as db  # noqa: E402
from bulk_labeling.core import labeling  # noqa: E402


def fresh_dataset(count):
    dataset = fo.Dataset()
    _bench.insert_bare_samples(dataset, count)
    _bench.settle()
    return dataset


def time_label_as(count):
    dataset = fresh_dataset(count)
    start = time.perf_counter()
    result = bl.label(dataset, add=["cat", "pet"], progress=False)
    elapsed = time.perf_counter() - start
    assert result["changed"] == count, result
    dataset.delete()
    return elapsed


def time_label_as_remove(count):
    dataset = fresh_dataset(count)
    bl.label(dataset, add=["cat", "pet"], progress=False)
    _bench.settle()
    start = time.perf_counter()
    result = bl.label(dataset, remove=["cat"], progress=False)
    elapsed = time.perf_counter() - start
    assert result["changed"] == count, result
    dataset.delete()
    return elapsed


def time_unjournaled_write(count, remove=False):
    """The same server-side writes as label_as, on the same batches and
    writer threads, without the journal: what the journal's overhead is
    measured against."""
    dataset = fresh_dataset(count)
    coll = db.sample_coll(dataset)
    field = "concepts"
    if remove:
        bl.label(dataset, add=["cat", "pet"], progress=False)

    if field not in dataset.get_field_schema():
        dataset.add_sample_field(field, fo.EmbeddedDocumentField,
                                 embedded_doc_type=fo.Classifications)
    params = {
        "add": [] if remove else ["cat", "pet"],
        "remove": ["cat"] if remove else [],
        "field": field,
        "negative": False,
        "target_field": field,
        "other_field": None,
    }
    prefixes = db.allocate_id_prefixes(dataset, len(params["add"]))
    pipeline = labeling._update_pipeline(params, prefixes)
    _bench.settle()

    def write(ids):
        query = labeling._changed_query(params, ids)
        return coll.update_many(query, pipeline).modified_count

    start = time.perf_counter()
    batches = ((ids,) for ids in db.iter_id_batches(dataset))
    changed = sum(n for _, n in db.map_batches(batches, write))
    elapsed = time.perf_counter() - start
    assert changed == count, changed
    dataset.delete()
    return elapsed


def time_tag_samples(count):
    dataset = fresh_dataset(count)
    start = time.perf_counter()
    dataset.tag_samples(["cat", "pet"])
    elapsed = time.perf_counter() - start
    dataset.delete()
    return elapsed


def time_set_values(count):
    dataset = fresh_dataset(count)
    start = time.perf_counter()
    ids = dataset.values("id")
    values = {
        i: fo.Classifications(classifications=[fo.Classification(label="cat"),
                                               fo.Classification(label="pet")])
        for i in ids
    }
    dataset.set_values("concepts", values, key_field="id")
    elapsed = time.perf_counter() - start
    dataset.delete()
    return elapsed


def time_save_loop(count, sample_size=2000):
    dataset = fresh_dataset(sample_size)
    start = time.perf_counter()
    for sample in dataset.iter_samples(autosave=False):
        sample["concepts"] = fo.Classifications(
            classifications=[fo.Classification(label="cat"),
                             fo.Classification(label="pet")])
        sample.save()
    elapsed = time.perf_counter() - start
    dataset.delete()
    return elapsed * count / sample_size


def with_writers(workers, fn):
    """``fn`` run with ``workers`` parallel writers."""
    def run(*args):
        previous = os.environ.get("BULK_LABELING_WRITE_WORKERS")
        os.environ["BULK_LABELING_WRITE_WORKERS"] = str(workers)
        try:
            return fn(*args)
        finally:
            if previous is None:
                del os.environ["BULK_LABELING_WRITE_WORKERS"]
            else:
                os.environ["BULK_LABELING_WRITE_WORKERS"] = previous
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-slow", action="store_true",
                        help="skip set_values and the save() loop")
    parser.add_argument("--skip-one-writer", action="store_true",
                        help="skip the journaling overhead with one writer")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    n = args.samples
    _bench.warm_up()
    workers = db.write_workers()

    variants = {
        "tag": (time_tag_samples,),
        "ours": (time_label_as,),
        "raw": (time_unjournaled_write,),
        "ours_rm": (time_label_as_remove,),
        "raw_rm": (time_unjournaled_write, True),
    }
    if workers > 1 and not args.skip_one_writer:
        variants.update({
            "ours1": (with_writers(1, time_label_as),),
            "raw1": (with_writers(1, time_unjournaled_write),),
            "ours_rm1": (with_writers(1, time_label_as_remove),),
            "raw_rm1": (with_writers(1, time_unjournaled_write), True),
        })

    # Rounds in alternating order; each ratio is the median of the
    # per-round ratios (a disturbed round spoils one pair, not the result)
    times = {name: [] for name in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            fn, *extra = variants[name]
            times[name].append(fn(n, *extra))
        print("round %d: %s" % (r + 1, ", ".join(
            "%s %.2f s" % (k, times[k][-1]) for k in variants)), flush=True)

    def row(ours, ours_label, base, base_label, required):
        ratio = statistics.median(a / b for a, b in zip(times[ours], times[base]))
        return (ours_label, statistics.median(times[ours]), base_label,
                statistics.median(times[base]), required, ratio)

    rows = [
        row("ours", "label_as add 2 concepts (journaled)", "tag", "tag_samples", 1.5),
        row("ours", "label_as add 2 concepts (journaled)", "raw", "same writes, no journal", 1.2),
        row("ours_rm", "label_as remove (journaled, captures labels)", "raw_rm", "same writes, no journal", 1.2),
    ]
    if "ours1" in times:
        rows += [
            row("ours1", "label_as add 2 concepts (journaled), 1 writer", "raw1",
                "same writes, no journal, 1 writer", 1.2),
            row("ours_rm1", "label_as remove (journaled), 1 writer", "raw_rm1",
                "same writes, no journal, 1 writer", 1.2),
            row("ours", "label_as add 2 concepts (journaled), %d writers" % workers,
                "ours1", "the same, 1 writer", None),
        ]
    if not args.skip_slow:
        ours = statistics.median(times["ours"])
        rows.append(("label_as add 2 concepts (journaled)", ours, "set_values", time_set_values(n), None))
        rows.append(("label_as add 2 concepts (journaled)", ours, "per-sample save() (extrapolated from 2,000)", time_save_loop(n), None))

    table = _bench.format_table(
        "Label as... on %s samples (%d writers unless noted; medians of %d "
        "rounds, ratios: median of per-round ratios)"
        % (format(n, ","), workers, args.rounds), rows,
        columns=("ours", "ours (s)", "baseline", "baseline (s)", "ratio ours/baseline", "required"),
    )
    print(table)
    if args.record:
        _bench.record("Label as", table)


if __name__ == "__main__":
    main()
