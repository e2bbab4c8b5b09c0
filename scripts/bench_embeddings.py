#!/usr/bin/env python
"""Benchmark: image embedding throughput of the smart-search pipeline.

Full-size ViT-B-32 (random weights saved to a local checkpoint, so nothing is
downloaded and both sides load the very same model through FiftyOne's
``open-clip-torch`` zoo model), on real photos (the offline photos of
:mod:`bulk_labeling.demo_data`). Measured side by side, in rounds, in one
run:

-   **ours**: :meth:`bulk_labeling.core.models.Embedder.iter_embed_files`,
    the path of ``build_similarity_index``: read + decode + preprocess in
    DataLoader workers, batched forward under ``torch.inference_mode``, in
    the default precision (``auto``: bf16 on CPUs that compute it natively),
    and also in fp32;
-   **model only** (the limit): the same forward, in the same precision, on
    ready tensors;
-   **FiftyOne**: ``dataset.compute_embeddings(zoo_model)``, FiftyOne's own
    path with the same zoo model, with its defaults (batch size 1) and with
    the same batch size as ours.

Required: ours >= 0.9x model-only and >= 1.2x FiftyOne (fp32, its only
precision on CPU). The agreement of our embeddings with FiftyOne's is
printed too. The best round of
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
    parser.add_argument("--precision", default="auto",
                        help="ours: auto (the default of build_similarity_index), "
                             "fp32, bf16 or fp16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-fiftyone-default", action="store_true",
                        help="skip FiftyOne at its default batch size 1")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)

    import torch

    paths = _images(args.images, args.size)
    kwargs = {"clip_model": "ViT-B-32", "pretrained": _checkpoint()}
    embedder = models.Embedder.load(kwargs, device="cpu", precision=args.precision)
    zoo_model = embedder.zoo_model
    # The same model in fp32, for the rows that isolate the precision
    fp32 = models.Embedder(zoo_model, precision="fp32")
    compare_fp32 = embedder.precision != "fp32"
    workers = (args.num_workers if args.num_workers is not None
               else models.default_num_workers(embedder.device))

    from PIL import Image

    tensors = torch.stack([embedder.preprocess(Image.open(p).convert("RGB"))
                           for p in paths])
    dataset = fo.Dataset()
    dataset.add_samples([fo.Sample(filepath=p) for p in paths])
    print("%d images (%d distinct real photos, up to %d px), batch %d, "
          "%d worker(s), %d torch threads, ours in %s"
          % (len(paths), len(set(paths)), args.size, args.batch_size, workers,
             torch.get_num_threads(), embedder.precision), flush=True)

    # Warm-up (first batches allocate, workers fork)
    for e in (embedder, fp32) if compare_fp32 else (embedder,):
        time_model_only(e, tensors[: args.batch_size], args.batch_size)
        time_ours(e, paths[: args.batch_size], args.batch_size, workers)

    best = {}

    def keep(name, seconds):
        best[name] = min(best.get(name, float("inf")), seconds)
        print("  %-28s %6.1f s  %5.1f img/s" % (name, seconds, len(paths) / seconds),
              flush=True)

    ours_emb = fo_emb = None
    fo_batch = "fiftyone (batch %d)" % args.batch_size
    for r in range(args.rounds):
        print("round %d" % (r + 1), flush=True)
        seconds, ours_emb = time_ours(embedder, paths, args.batch_size, workers)
        keep("ours", seconds)
        keep("model only", time_model_only(embedder, tensors, args.batch_size))
        if compare_fp32:
            seconds, _ = time_ours(fp32, paths, args.batch_size, workers)
            keep("ours fp32", seconds)
            keep("model only fp32", time_model_only(fp32, tensors, args.batch_size))
        seconds, fo_emb = time_fiftyone(dataset, zoo_model, args.batch_size, None)
        keep(fo_batch, seconds)
        if not args.skip_fiftyone_default and r == 0:
            seconds, _ = time_fiftyone(dataset, zoo_model, None, None)
            keep("fiftyone (default, batch 1)", seconds)

    fo_norm = fo_emb / np.linalg.norm(fo_emb, axis=1, keepdims=True)
    agreement = float((ours_emb * fo_norm).sum(axis=1).min())

    rate = {k: len(paths) / v for k, v in best.items()}
    # (ours row, baseline row, required minimum ratio)
    rows = [
        ("ours", "model only", 0.9),
        ("ours", fo_batch, 1.2),
    ]
    if "fiftyone (default, batch 1)" in rate:
        rows.append(("ours", "fiftyone (default, batch 1)", 1.2))
    if compare_fp32:
        rows += [
            ("ours fp32", "model only fp32", None),
            ("ours fp32", fo_batch, None),
        ]
    names = {
        "ours": "**ours**, %s (read + decode + preprocess + model)" % embedder.precision,
        "ours fp32": "ours, fp32",
        "model only": "model only, %s (forward on ready tensors)" % embedder.precision,
        "model only fp32": "model only, fp32",
        fo_batch: "FiftyOne compute_embeddings (fp32), batch %d" % args.batch_size,
        "fiftyone (default, batch 1)": "FiftyOne compute_embeddings (fp32), default (batch 1)",
    }

    lines = [
        "### ViT-B-32 image embeddings, %d real photos" % len(paths),
        "",
        "%s; %s; no GPU; torch %s, %d threads; batch %d, %d decode worker(s); "
        "best of %d round(s); peak RSS %.0f MB" % (
            datetime.date.today().isoformat(), _bench.machine(),
            torch.__version__, torch.get_num_threads(), args.batch_size,
            workers, args.rounds, _bench.peak_rss_mb()),
        "",
        "| ours | ours (images/s) | baseline | baseline (images/s) | ratio ours/baseline | required |",
        "|---|---|---|---|---|---|",
    ]
    for ours, base, required in rows:
        ratio = rate[ours] / rate[base]
        verdict = ""
        if required is not None:
            verdict = "≥ %.1f× %s" % (required, "✅" if ratio >= required else "❌")
        lines.append("| %s | %.2f | %s | %.2f | %.2f× | %s |" % (
            names[ours], rate[ours], names[base], rate[base], ratio, verdict))
    lines += [
        "",
        "Embeddings of ours (%s) and FiftyOne's path (fp32) agree: min cosine "
        "%.5f over the %d images." % (embedder.precision, agreement, len(paths)),
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
