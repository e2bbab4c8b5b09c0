#!/usr/bin/env python
"""Benchmark: image embedding throughput of the smart-search pipeline.

Full-size ViT-B-32 (random weights saved to a local checkpoint, so nothing is
downloaded and both sides load the very same model through FiftyOne's
``open-clip-torch`` zoo model), on real photos (the offline photos of
:mod:`bulk_labeling.demo_data`). Measured side by side, in rounds, in one
run:

-   **ours**: :meth:`bulk_labeling.core.models.Embedder.iter_embed_files`,
    the path of ``build_similarity_index``: read + decode + preprocess in
    DataLoader workers, batched forward under ``torch.inference_mode``;
-   **model only** (the limit): the same forward on ready tensors;
-   **FiftyOne**: ``dataset.compute_embeddings(zoo_model)``, FiftyOne's own
    path with the same zoo model, with its defaults (batch size 1) and with
    the same batch size as ours.

Required: ours >= 0.9x model-only and >= 1.2x FiftyOne. The best round of
each is reported (the machine is shared; the best round is the least
disturbed). ``--record`` appends the table to ``docs/BENCHMARKS.md`` under
"## Embeddings".

Usage::

    .venv/bin/python scripts/bench_embeddings.py [--images 192] [--rounds 2] [--record]
"""

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _bench  # noqa: E402  (isolated database; must precede fiftyone)

import numpy as np  # noqa: E402

import fiftyone as fo  # noqa: E402

from bulk_labeling import demo_data  # noqa: E402
from bulk_labeling.core import models  # noqa: E402


def _images(count, size):
    photos = demo_data.export_photos(
        demo_data.DEFAULT_CACHE / ("photos_%d" % size), size=size
    )
    paths = [p for p, _ in photos]
    if not paths:
        raise SystemExit("no offline photos found (apt-get install tuxpaint-stamps-default)")
    # Repeat the real photos up to `count` (each read from disk every time)
    return [paths[i % len(paths)] for i in range(count)]


def _checkpoint():
    """A random ViT-B-32 saved as a local checkpoint (cached)."""
    import torch
    import open_clip

    path = models.cache_dir() / "bench" / "ViT-B-32-random.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None)
        torch.save(model.state_dict(), path)
    return str(path)


def time_ours(embedder, paths, batch_size, num_workers):
    start = time.perf_counter()
    out = []
    for indices, emb, failed in embedder.iter_embed_files(
        paths, batch_size=batch_size, num_workers=num_workers
    ):
        assert not failed
        out.append(emb)
    return time.perf_counter() - start, np.concatenate(out)


def time_model_only(embedder, tensors, batch_size):
    start = time.perf_counter()
    for i in range(0, len(tensors), batch_size):
        embedder.embed_tensors(tensors[i:i + batch_size])
    return time.perf_counter() - start


def time_fiftyone(dataset, zoo_model, batch_size, num_workers):
    start = time.perf_counter()
    emb = dataset.compute_embeddings(zoo_model, batch_size=batch_size,
                                     num_workers=num_workers, progress=False)
    return time.perf_counter() - start, np.asarray(emb)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--size", type=int, default=512,
                        help="longest side of the exported photos")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-fiftyone-default", action="store_true",
                        help="skip FiftyOne at its default batch size 1")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)

    import torch

    paths = _images(args.images, args.size)
    kwargs = {"clip_model": "ViT-B-32", "pretrained": _checkpoint()}
    embedder = models.Embedder.load(kwargs, device="cpu")
    zoo_model = embedder.zoo_model
    workers = (args.num_workers if args.num_workers is not None
               else models.default_num_workers(embedder.device))

    from PIL import Image

    tensors = torch.stack([embedder.preprocess(Image.open(p).convert("RGB"))
                           for p in paths])
    dataset = fo.Dataset()
    dataset.add_samples([fo.Sample(filepath=p) for p in paths])
    print("%d images (%d distinct real photos, up to %d px), batch %d, "
          "%d worker(s), %d torch threads"
          % (len(paths), len(set(paths)), args.size, args.batch_size, workers,
             torch.get_num_threads()), flush=True)

    # Warm-up (first batches allocate, workers fork)
    time_model_only(embedder, tensors[: args.batch_size], args.batch_size)
    time_ours(embedder, paths[: args.batch_size], args.batch_size, workers)

    best = {}

    def keep(name, seconds):
        best[name] = min(best.get(name, float("inf")), seconds)
        print("  %-28s %6.1f s  %5.1f img/s" % (name, seconds, len(paths) / seconds),
              flush=True)

    ours_emb = fo_emb = None
    for r in range(args.rounds):
        print("round %d" % (r + 1), flush=True)
        seconds, ours_emb = time_ours(embedder, paths, args.batch_size, workers)
        keep("ours", seconds)
        keep("model only", time_model_only(embedder, tensors, args.batch_size))
        seconds, fo_emb = time_fiftyone(dataset, zoo_model, args.batch_size, None)
        keep("fiftyone (batch %d)" % args.batch_size, seconds)
        if not args.skip_fiftyone_default and r == 0:
            seconds, _ = time_fiftyone(dataset, zoo_model, None, None)
            keep("fiftyone (default, batch 1)", seconds)

    fo_norm = fo_emb / np.linalg.norm(fo_emb, axis=1, keepdims=True)
    agreement = float((ours_emb * fo_norm).sum(axis=1).min())

    rate = {k: len(paths) / v for k, v in best.items()}
    rows = [
        ("model only (forward on ready tensors)", rate["model only"], None),
        ("FiftyOne compute_embeddings, batch %d" % args.batch_size,
         rate["fiftyone (batch %d)" % args.batch_size], None),
    ]
    if "fiftyone (default, batch 1)" in rate:
        rows.append(("FiftyOne compute_embeddings, default (batch 1)",
                     rate["fiftyone (default, batch 1)"], None))

    ours = rate["ours"]
    lines = [
        "### ViT-B-32 image embeddings, %d real photos" % len(paths),
        "",
        "%s; %s; no GPU; torch %s, %d threads; batch %d, %d decode worker(s); "
        "best of %d round(s); peak RSS %.0f MB" % (
            datetime.date.today().isoformat(), _bench.machine(),
            torch.__version__, torch.get_num_threads(), args.batch_size,
            workers, args.rounds, _bench.peak_rss_mb()),
        "",
        "| path | images/s | ours vs it | required |",
        "|---|---|---|---|",
        "| **ours** (read + decode + preprocess + model) | %.2f | | |" % ours,
    ]
    for name, value, _ in rows:
        ratio = ours / value
        required = ""
        if name.startswith("model only"):
            required = "≥ 0.9× %s" % ("✅" if ratio >= 0.9 else "❌")
        elif "batch %d" % args.batch_size in name and "default" not in name:
            required = "≥ 1.2× %s" % ("✅" if ratio >= 1.2 else "❌")
        elif "default" in name:
            required = "≥ 1.2× %s" % ("✅" if ratio >= 1.2 else "❌")
        lines.append("| %s | %.2f | %.2f× | %s |" % (name, value, ratio, required))
    lines += [
        "",
        "Embeddings of ours and FiftyOne's path agree (min cosine %.5f)." % agreement,
        "",
    ]
    table = "\n".join(lines)
    print()
    print(table)
    if args.record:
        _bench.record("Embeddings", table)
        print("recorded in docs/BENCHMARKS.md")
    dataset.delete()


if __name__ == "__main__":
    main()
