#!/usr/bin/env python
"""Trains a tiny open_clip model on synthetic images, offline, on the CPU.

No CLIP weights can be downloaded on the machines this project runs on (see
docs/SMART_SEARCH.md), so the tests and the demo use a small CLIP trained here
on PIL renders of coloured shapes ("a photo of a red star") in about five
minutes on two CPU cores. It is a real open_clip model: an architecture
config (``plugins/bulk_labeling/model_configs/bl-tiny-clip.json``) plus a
checkpoint, loaded exactly like a user's own local checkpoint::

    bl.build_similarity_index(
        dataset,
        model="bl-tiny-clip",
        pretrained="~/.cache/bulk_labeling/models/bl-tiny-clip/bl-tiny-clip.pt",
        model_config="~/.cache/bulk_labeling/models/bl-tiny-clip/bl-tiny-clip.json",
    )

Usage::

    python scripts/train_tiny_clip.py            # trains if missing
    python scripts/train_tiny_clip.py --force    # retrains

The output folder (default ``$BULK_LABELING_CACHE/models/bl-tiny-clip``, i.e.
``~/.cache/bulk_labeling/models/bl-tiny-clip``) receives ``bl-tiny-clip.json``
(the architecture), ``bl-tiny-clip.pt`` (fp16 weights, ~26 MB) and
``metrics.json`` (held-out zero-shot accuracy and retrieval precision).

The renderer (:func:`render`, :data:`COLOURS`, :data:`SHAPES`) is also used by
the tests to draw held-out images the model never saw.
"""

import argparse
import json
import math
import os
import pathlib
import random
import shutil
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

REPO = pathlib.Path(__file__).resolve().parents[1]
ARCH = "bl-tiny-clip"
CONFIG_PATH = REPO / "plugins" / "bulk_labeling" / "model_configs" / (ARCH + ".json")

COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 160, 50),
    "blue": (35, 70, 215),
    "yellow": (240, 205, 25),
    "purple": (135, 45, 175),
    "orange": (245, 130, 10),
}
SHAPES = ["circle", "square", "triangle", "star"]
CLASSES = [(c, s) for c in COLOURS for s in SHAPES]

RENDER_SIZE = 128

_FULL_TEMPLATES = [
    "a photo of a {c} {s}",
    "a {c} {s}",
    "a picture of a {c} {s}",
    "{c} {s}",
    "a photo of a {s} that is {c}",
    "a {c} {s} on a plain background",
]
_COLOUR_TEMPLATES = ["a photo of a {c} shape", "something {c}", "a {c} object"]
_SHAPE_TEMPLATES = ["a photo of a {s}", "a {s}", "a {s} shape"]


def default_out_dir():
    cache = os.environ.get("BULK_LABELING_CACHE", "~/.cache/bulk_labeling")
    return pathlib.Path(cache).expanduser() / "models" / ARCH


def _polygon(shape, cx, cy, r, angle):
    if shape == "square":
        n, radii = 4, [r] * 4
        angle += math.pi / 4
    elif shape == "triangle":
        n, radii = 3, [r * 1.1] * 3
    else:  # star
        n, radii = 10, [r * 1.1 if i % 2 == 0 else r * 0.45 for i in range(10)]
    return [
        (
            cx + radii[i] * math.cos(angle + 2 * math.pi * i / n),
            cy + radii[i] * math.sin(angle + 2 * math.pi * i / n),
        )
        for i in range(n)
    ]


def render(colour, shape, rng, size=RENDER_SIZE):
    """Draws one ``colour`` ``shape`` at a random place, size, rotation and
    shade on a random light, noisy background. ``rng`` is a
    :class:`random.Random`."""
    bg = tuple(rng.randint(175, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    rgb = tuple(
        int(min(255, max(0, v + rng.randint(-25, 25)))) for v in COLOURS[colour]
    )
    r = rng.uniform(0.22, 0.42) * size
    cx = rng.uniform(r, size - r)
    cy = rng.uniform(r, size - r)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi)),
                     fill=rgb)

    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(
        0, rng.uniform(0, 10), (size, size, 3)
    )
    array = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255)
    return Image.fromarray(array.astype(np.uint8))


def caption(colour, shape, rng):
    """A random caption and the (colour, shape) attributes it names (None for
    an attribute it leaves open)."""
    p = rng.random()
    if p < 0.12:
        return rng.choice(_COLOUR_TEMPLATES).format(c=colour), (colour, None)
    if p < 0.24:
        return rng.choice(_SHAPE_TEMPLATES).format(s=shape), (None, shape)
    return rng.choice(_FULL_TEMPLATES).format(c=colour, s=shape), (colour, shape)


def write_held_out(dest, per_class=6, seed=12345):
    """Renders held-out JPEGs (a seed the training never uses) under
    ``dest/<colour>_<shape>/``. Returns ``[(path, "colour shape")]``."""
    dest = pathlib.Path(dest)
    rng = random.Random(seed)
    out = []
    for colour, shape in CLASSES:
        folder = dest / ("%s_%s" % (colour, shape))
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / ("%02d.jpg" % i)
            render(colour, shape, rng).save(path, quality=90)
            out.append((str(path), "%s %s" % (colour, shape)))
    return out


def _load_open_clip():
    import open_clip

    open_clip.add_model_config(CONFIG_PATH)
    return open_clip


def _batch(rng, batch_size, preprocess, tokenizer):
    import torch

    images, texts, img_attrs, txt_attrs = [], [], [], []
    for _ in range(batch_size):
        colour, shape = rng.choice(CLASSES)
        images.append(preprocess(render(colour, shape, rng)))
        text, attrs = caption(colour, shape, rng)
        texts.append(text)
        img_attrs.append((colour, shape))
        txt_attrs.append(attrs)

    # targets[i, j]: text j describes image i (its named attributes match)
    targets = torch.tensor(
        [
            [
                float(all(t is None or t == a for t, a in zip(ta, ia)))
                for ta in txt_attrs
            ]
            for ia in img_attrs
        ]
    )
    classes = sorted(set(img_attrs))
    one_hot = torch.zeros(len(img_attrs), len(classes))
    for i, attrs in enumerate(img_attrs):
        one_hot[i, classes.index(attrs)] = 1
    return torch.stack(images), tokenizer(texts), targets, one_hot


def evaluate(model, preprocess, tokenizer, seed=999, per_class=20):
    """Held-out zero-shot accuracy and image-to-image / text-to-image
    precision@10."""
    import torch

    rng = random.Random(seed)
    labels, images = [], []
    for ci, (colour, shape) in enumerate(CLASSES):
        for _ in range(per_class):
            images.append(preprocess(render(colour, shape, rng)))
            labels.append(ci)
    labels = torch.tensor(labels)
    model.eval()
    with torch.inference_mode():
        img = torch.nn.functional.normalize(
            model.encode_image(torch.stack(images)), dim=-1
        )
        prompts = ["a photo of a %s %s" % cs for cs in CLASSES]
        txt = torch.nn.functional.normalize(
            model.encode_text(tokenizer(prompts)), dim=-1
        )
    zero_shot = float(((img @ txt.T).argmax(1) == labels).float().mean())

    sims = img @ img.T
    sims.fill_diagonal_(-2)
    top = sims.topk(10, dim=1).indices
    p_img = float((labels[top] == labels[:, None]).float().mean())
    top_t = (txt @ img.T).topk(10, dim=1).indices
    p_txt = float((labels[top_t] == torch.arange(len(CLASSES))[:, None]).float().mean())
    model.train()
    return {
        "zero_shot_top1": round(zero_shot, 4),
        "image_precision_at_10": round(p_img, 4),
        "text_precision_at_10": round(p_txt, 4),
        "num_classes": len(CLASSES),
        "held_out_images": len(labels),
    }


def train(out_dir=None, steps=1000, batch_size=64, lr=5e-4, seed=0,
          threads=1, log_every=50, eval_every=0):
    """Trains the model and writes it to ``out_dir``. Returns the metrics."""
    import torch
    import torch.nn.functional as F

    out_dir = pathlib.Path(out_dir or default_out_dir()).expanduser()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)

    open_clip = _load_open_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH)
    tokenizer = open_clip.get_tokenizer(ARCH)
    model.train()

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6,
    )
    warmup = max(1, steps // 12)

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * t))

    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        images, texts, targets, targets_img = _batch(rng, batch_size, preprocess, tokenizer)
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(texts), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        loss_i = -(F.log_softmax(logits, 1) * (targets / targets.sum(1, keepdim=True))).sum(1).mean()
        loss_t = -(F.log_softmax(logits.T, 1) * (targets.T / targets.T.sum(1, keepdim=True))).sum(1).mean()
        # Images of the same class pull together directly too (supervised
        # contrastive over the batch): image-to-image search needs tight
        # clusters, not only a good match with the caption
        same = (targets_img @ targets_img.T > 0).float()
        same.fill_diagonal_(0)
        has_pos = same.sum(1) > 0
        logits_ii = model.logit_scale.exp().clamp(max=100) * img @ img.T
        logits_ii = logits_ii - torch.eye(len(img)) * 1e4
        loss_ii = -(F.log_softmax(logits_ii, 1) * same).sum(1)[has_pos] / same.sum(1)[has_pos]
        loss = (loss_i + loss_t) / 2 + loss_ii.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print("step %4d/%d  loss %.3f  %.0fs" % (step, steps, loss.item(), time.time() - start),
                  flush=True)
        if eval_every and step and step % eval_every == 0:
            print("  eval %s" % json.dumps(evaluate(model, preprocess, tokenizer, per_class=5)),
                  flush=True)

    metrics = evaluate(model, preprocess, tokenizer)
    metrics.update(steps=steps, batch_size=batch_size, seed=seed,
                   train_seconds=round(time.time() - start, 1),
                   torch_threads=torch.get_num_threads())
    print(json.dumps(metrics), flush=True)

    # Write atomically: a half-written model is never picked up
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp%d" % os.getpid())
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(CONFIG_PATH, tmp / (ARCH + ".json"))
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, tmp / (ARCH + ".pt"))
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return metrics


def model_files(out_dir=None):
    """``(checkpoint, config)`` paths of the trained model."""
    out_dir = pathlib.Path(out_dir or default_out_dir()).expanduser()
    return out_dir / (ARCH + ".pt"), out_dir / (ARCH + ".json")


def ensure_model(out_dir=None, **kwargs):
    """Trains the model unless it is already there; safe when several
    processes call it at once (a file lock). Returns ``(checkpoint, config)``."""
    import fcntl

    ckpt, config = model_files(out_dir)
    if ckpt.exists() and config.exists():
        return ckpt, config

    ckpt.parent.parent.mkdir(parents=True, exist_ok=True)
    with open(ckpt.parent.parent / (ARCH + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (ckpt.exists() and config.exists()):
            train(out_dir, **kwargs)
    return ckpt, config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="output folder")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: fastest on a shared machine, "
                             "and the same numerics everywhere)")
    parser.add_argument("--force", action="store_true", help="retrain even if present")
    args = parser.parse_args(argv)
    kwargs = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                  seed=args.seed, threads=args.threads,
                  eval_every=args.eval_every)
    if args.force:
        train(args.out, **kwargs)
    else:
        ensure_model(args.out, **kwargs)
    ckpt, config = model_files(args.out)
    print("model: pretrained=%s model_config=%s" % (ckpt, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
