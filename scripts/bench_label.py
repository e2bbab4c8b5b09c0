"""Benchmark: "Label as..." on N samples against FiftyOne's own ways to write
the same labels, in one run, with the journal's overhead broken out.

Usage::

    .venv/bin/python scripts/bench_label.py [--samples 100000] [--record]

Prints one table; ``--record`` appends it to docs/BENCHMARKS.md. Runs in a
database of its own (a temporary FIFTYONE_DATABASE_DIR), never the user's.
"""

import argparse
import os
import sys
import tempfile
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
    start = time.perf_counter()
    result = bl.label(dataset, remove=["cat"], progress=False)
    elapsed = time.perf_counter() - start
    assert result["changed"] == count, result
    dataset.delete()
    return elapsed


def time_unjournaled_write(count, remove=False):
    """The same server-side writes as label_as, without the journal: what
    the journal's overhead is measured against."""
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
    start = time.perf_counter()
    changed = 0
    for ids in db.iter_id_batches(dataset):
        res = coll.update_many(labeling._changed_query(params, ids), pipeline)
        changed += res.modified_count
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


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-slow", action="store_true",
                        help="skip set_values and the save() loop")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    n = args.samples

    def best(fn, *a):
        return min(fn(*a) for _ in range(args.repeats))

    rows = []
    tag = best(time_tag_samples, n)
    ours = best(time_label_as, n)
    raw = best(time_unjournaled_write, n)
    ours_rm = best(time_label_as_remove, n)
    raw_rm = best(time_unjournaled_write, n, True)
    rows.append(("label_as add 2 concepts (journaled)", ours, "tag_samples", tag, 1.5))
    rows.append(("label_as add 2 concepts (journaled)", ours, "same writes, no journal", raw, 1.2))
    rows.append(("label_as remove (journaled, captures labels)", ours_rm, "same writes, no journal", raw_rm, 1.2))
    if not args.skip_slow:
        rows.append(("label_as add 2 concepts (journaled)", ours, "set_values", time_set_values(n), None))
        rows.append(("label_as add 2 concepts (journaled)", ours, "per-sample save() (extrapolated from 2,000)", time_save_loop(n), None))

    table = _bench.format_table(
        "Label as... on %s samples" % format(n, ","), rows,
        columns=("ours", "ours (s)", "baseline", "baseline (s)", "ratio ours/baseline", "required"),
    )
    print(table)
    if args.record:
        _bench.record("Label as", table)


if __name__ == "__main__":
    main()
