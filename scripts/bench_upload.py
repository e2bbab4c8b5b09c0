"""Benchmark: "Upload with concepts" vs FiftyOne's own import, in one run.

Imports N real image files (default 10,000: the offline photos of
:mod:`bulk_labeling.demo_data`, rescaled and re-encoded into distinct files)
twice per round, each time into a fresh dataset:

-   baseline: ``Dataset.add_images(paths)`` then ``compute_metadata()``
    (no labels);
-   ours: ``bulk_labeling.upload(dataset, folder, concepts=[2 concepts],
    metadata={...})``, which also checks (decodes) every file and journals
    the operation.

Prints the times and the ratio (required: at most 1.2x); ``--record``
appends the table to ``docs/BENCHMARKS.md`` under "## Upload". Runs in a
database of its own (see ``scripts/_bench.py``), never the user's.

Usage::

    .venv/bin/python scripts/bench_upload.py [--files 10000] [--rounds 2] [--record]
"""

import argparse
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import _bench  # noqa: E402  (sets up an isolated database before fiftyone)

import fiftyone as fo  # noqa: E402

import bulk_labeling as bl  # noqa: E402
from bulk_labeling import demo_data  # noqa: E402

REQUIRED_RATIO = 1.2
CONCEPTS = ["animal", "outdoor"]
METADATA = {
    "source": "bench",
    "batch": 7,
    "camera": {"id": 3, "site": "north", "calibrated": True},
}


def make_files(dest, count):
    """Writes ``count`` distinct real images under ``dest`` (100 per folder):
    each offline photo rescaled and re-encoded; every 10th is a PNG."""
    from PIL import Image

    photos = [p for p, _ in demo_data.export_photos()]
    sources = []
    for path in photos:
        with Image.open(path) as img:
            sources.append(img.convert("RGB"))

    paths = []
    for i in range(count):
        src = sources[i % len(sources)]
        variant = i // len(sources)
        scale = 0.6 + 0.4 * ((variant * 37) % 101) / 100
        size = (max(16, int(src.width * scale)), max(16, int(src.height * scale)))
        img = src.resize(size)
        folder = dest / ("%03d" % (i // 100))
        folder.mkdir(parents=True, exist_ok=True)
        if i % 10 == 9:
            path = folder / ("img%05d.png" % i)
            img.save(path)
        else:
            path = folder / ("img%05d.jpg" % i)
            img.save(path, quality=70 + variant % 25)
        paths.append(str(path))

    return paths


def warm(paths):
    """Reads every file once, so both contenders start with a warm cache."""
    for path in paths:
        with open(path, "rb") as f:
            f.read()


def run_baseline(paths):
    dataset = fo.Dataset()
    start = time.perf_counter()
    dataset.add_images(paths, progress=False)
    dataset.compute_metadata(progress=False)
    elapsed = time.perf_counter() - start
    assert dataset.count() == len(paths)
    assert dataset.count("metadata") == len(paths)
    dataset.delete()
    return elapsed


def run_upload(root, count):
    dataset = fo.Dataset()
    start = time.perf_counter()
    result = bl.upload(
        dataset, str(root), concepts=CONCEPTS, metadata=METADATA,
        progress=False,
    )
    elapsed = time.perf_counter() - start
    assert result["added"] == count, result["skipped"][:5]
    assert dataset.count("metadata") == count
    assert dataset.count_values("concepts.classifications.label") == {
        c: count for c in CONCEPTS
    }
    assert dataset.count("custom_metadata") == count
    dataset.delete()
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating runs of each; medians are reported")
    parser.add_argument("--record", action="store_true",
                        help="append the table to docs/BENCHMARKS.md")
    args = parser.parse_args()

    load_start = os.getloadavg()[0]
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench_upload_files_"))
    try:
        root = workdir / "images"
        t = time.perf_counter()
        paths = make_files(root, args.files)
        print("made %d files in %.1fs" % (len(paths), time.perf_counter() - t))
        warm(paths)

        baseline, ours = [], []
        for r in range(args.rounds):
            baseline.append(run_baseline(paths))
            ours.append(run_upload(root, len(paths)))
            print(
                "round %d: add_images + compute_metadata %.2fs | upload %.2fs"
                " | ratio %.2f"
                % (r + 1, baseline[-1], ours[-1], ours[-1] / baseline[-1])
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    t_base, t_ours = statistics.median(baseline), statistics.median(ours)
    rows = [(
        "`upload` (checked, 2 concepts + metadata, journaled)", t_ours,
        "`add_images` + `compute_metadata()`", t_base, REQUIRED_RATIO,
    )]
    table = _bench.format_table(
        "Upload of %s image files (median of %d rounds; ours/baseline per "
        "round: %s; load average %.1f at start, %.1f at end)" % (
            format(len(paths), ","), args.rounds,
            ", ".join("%.2f/%.2f s" % p for p in zip(ours, baseline)),
            load_start, os.getloadavg()[0]),
        rows,
        columns=("ours", "ours (s)", "baseline", "baseline (s)",
                 "ratio ours/baseline", "required"),
    )
    print(table)
    if args.record:
        _bench.record("Upload", table)
        print("recorded in docs/BENCHMARKS.md")

    return 0 if t_ours / t_base <= REQUIRED_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
