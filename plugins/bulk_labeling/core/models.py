"""open_clip models for smart search: resolve, check, load and embed.

A model is named the way open_clip names it: an architecture (``"ViT-B-32"``)
and ``pretrained`` weights, either an open_clip tag (``"openai"``) or the
path of a local checkpoint file. A custom architecture comes with its open_clip
JSON config (``model_config``), which is registered with
``open_clip.add_model_config``.

Similarity indexes store their model the way fiftyone-brain can reload it in
any later process (the App, a delegated worker, a new Python session): the
zoo model ``"open-clip-torch"`` plus ``model_kwargs`` (see
:meth:`ModelSpec.zoo_kwargs`). A custom architecture is stored as an open_clip
``local-dir:`` bundle (its config plus a link to its checkpoint), which open_clip
loads with no registration at all, so text search works even where this
package is never imported.

Nothing here imports torch or open_clip at module level.
"""

import hashlib
import json
import os
import pathlib
import socket
import threading

from .errors import BulkLabelingError

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"

#: The FiftyOne zoo model that fiftyone-brain reloads to embed text prompts
ZOO_MODEL = "open-clip-torch"

#: open_clip JSON configs shipped with the package (custom architectures)
CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "model_configs"

LOCAL_DIR_PREFIX = "local-dir:"

_HUB_PROBE_TIMEOUT = 3.0


def cache_dir():
    """Where bulk_labeling keeps models: ``$BULK_LABELING_CACHE/models``
    (default ``~/.cache/bulk_labeling/models``)."""
    root = os.environ.get("BULK_LABELING_CACHE", "~/.cache/bulk_labeling")
    return pathlib.Path(root).expanduser() / "models"


class ModelSpec(object):
    """A validated open_clip model: architecture, weights and, for a custom
    architecture, its JSON config."""

    def __init__(self, arch, pretrained, model_config=None):
        self.arch = arch
        self.pretrained = pretrained
        self.model_config = model_config

    @property
    def is_local_dir(self):
        return self.arch.startswith(LOCAL_DIR_PREFIX)

    @property
    def is_checkpoint(self):
        return self.pretrained is not None and os.path.isfile(self.pretrained)

    def describe(self):
        if self.is_local_dir:
            return self.arch
        return "%s (%s)" % (self.arch, self.pretrained)

    def zoo_kwargs(self):
        """The ``model_kwargs`` of the ``open-clip-torch`` zoo model that
        loads this model in any process."""
        # open_clip ignores `pretrained` for a local-dir model (the folder
        # holds the weights); "" keeps FiftyOne's default tag out of it
        if self.model_config is not None:
            return {"clip_model": LOCAL_DIR_PREFIX + str(_bundle(self)),
                    "pretrained": ""}
        if self.is_local_dir:
            return {"clip_model": self.arch, "pretrained": ""}
        return {"clip_model": self.arch, "pretrained": self.pretrained}

    def to_dict(self):
        return {
            "model": self.arch,
            "pretrained": self.pretrained,
            "model_config": self.model_config,
        }


def resolve(model=DEFAULT_MODEL, pretrained=DEFAULT_PRETRAINED,
            model_config=None):
    """Validates a model choice without loading anything.

    Args:
        model ("ViT-B-32"): an open_clip architecture, or
            ``"local-dir:/path"`` (an open_clip folder with
            ``open_clip_config.json`` and weights)
        pretrained ("openai"): an open_clip tag or the path of a local
            checkpoint file
        model_config (None): the path of an open_clip JSON config for a
            custom architecture; its file name (without ``.json``) is the
            architecture's name

    Returns:
        a :class:`ModelSpec`
    """
    model = (model or DEFAULT_MODEL).strip()
    if isinstance(pretrained, str):
        pretrained = pretrained.strip() or None

    if model.startswith(LOCAL_DIR_PREFIX):
        folder = pathlib.Path(model[len(LOCAL_DIR_PREFIX):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise BulkLabelingError(
                "'%s' is not an open_clip model folder (it needs an "
                "open_clip_config.json and a checkpoint)" % folder
            )
        return ModelSpec(LOCAL_DIR_PREFIX + str(folder.resolve()), None)

    if model_config:
        path = pathlib.Path(model_config).expanduser()
        if not path.is_file():
            raise BulkLabelingError("Model config '%s' does not exist" % path)
        _read_config(path)  # validates it
        name = path.stem
        if model not in (DEFAULT_MODEL, name):
            raise BulkLabelingError(
                "The architecture defined by '%s' is named '%s' (its file "
                "name); pass model='%s' or leave model unset"
                % (path.name, name, name)
            )
        if not pretrained or not os.path.isfile(os.path.expanduser(pretrained)):
            raise BulkLabelingError(
                "A custom architecture (model_config=%s) needs its weights: "
                "pass pretrained=<path to a local checkpoint file>%s"
                % (path.name, "" if not pretrained else
                   " ('%s' is not a file)" % pretrained)
            )
        return ModelSpec(
            name,
            str(pathlib.Path(pretrained).expanduser().resolve()),
            str(path.resolve()),
        )

    if not pretrained:
        raise BulkLabelingError(
            "pretrained is required: an open_clip tag such as 'openai', or "
            "the path of a local checkpoint file. Randomly initialised "
            "weights cannot be reloaded to embed text queries later"
        )

    shipped = CONFIGS_DIR / (model + ".json")
    expanded = os.path.expanduser(pretrained)
    looks_like_path = os.sep in pretrained or os.path.splitext(pretrained)[1]
    if os.path.isfile(expanded):
        pretrained = str(pathlib.Path(expanded).resolve())
    elif looks_like_path:
        raise BulkLabelingError(
            "Checkpoint file '%s' does not exist" % pretrained
        )

    if shipped.is_file():
        # A custom architecture shipped with this package
        if not os.path.isfile(pretrained):
            raise BulkLabelingError(
                "'%s' has no downloadable weights: pass pretrained=<path to "
                "its checkpoint>" % model
            )
        return ModelSpec(model, pretrained, str(shipped))

    return ModelSpec(model, pretrained)


def _read_config(path):
    try:
        with open(path) as f:
            cfg = json.load(f)
    except Exception as e:
        raise BulkLabelingError(
            "Model config '%s' is not valid JSON: %s" % (path, e)
        )
    cfg = cfg.get("model_cfg", cfg)
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise BulkLabelingError(
            "Model config '%s' is not an open_clip model config (missing %s)"
            % (path, ", ".join(missing))
        )
    return cfg


def _bundle(spec):
    """An open_clip ``local-dir:`` folder for a custom architecture: its
    config and a link to its checkpoint. Folders are content-addressed and
    written atomically, so concurrent builds agree."""
    cfg = _read_config(spec.model_config)
    ckpt = pathlib.Path(spec.pretrained)
    digest = hashlib.sha1(
        json.dumps([cfg, str(ckpt)], sort_keys=True).encode()
    ).hexdigest()[:12]
    folder = cache_dir() / "bundles" / ("%s-%s" % (spec.arch, digest))
    link_name = (
        "open_clip_model.safetensors"
        if ckpt.suffix == ".safetensors"
        else "open_clip_pytorch_model.bin"
    )
    if (folder / "open_clip_config.json").is_file() and (folder / link_name).exists():
        return folder

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + ".tmp%d" % os.getpid())
    tmp.mkdir(exist_ok=True)
    with open(tmp / "open_clip_config.json", "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {},
                   "bulk_labeling": {"arch": spec.arch,
                                     "model_config": spec.model_config,
                                     "checkpoint": str(ckpt)}},
                  f, indent=2)
    target = tmp / link_name
    if not target.exists():
        try:
            target.symlink_to(ckpt)
        except OSError:
            try:
                os.link(ckpt, target)
            except OSError:
                import shutil

                shutil.copyfile(ckpt, target)
    try:
        os.replace(tmp, folder)
    except OSError:
        # Another process created it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


_registered = set()
_register_lock = threading.Lock()


def register_configs(extra=()):
    """Registers the package's shipped architectures (and ``extra`` JSON
    configs) with open_clip, once per process."""
    paths = [CONFIGS_DIR] + [pathlib.Path(p) for p in extra if p]
    with _register_lock:
        todo = [p for p in paths if str(p) not in _registered]
        if not todo:
            return
        import open_clip

        for path in todo:
            if path.exists():
                open_clip.add_model_config(path)
            _registered.add(str(path))


def arch_of(zoo_kwargs):
    return (zoo_kwargs or {}).get("clip_model") or DEFAULT_MODEL


def check_weights(zoo_kwargs):
    """Fails fast, with a clear message, when the weights cannot be had.

    A local checkpoint or ``local-dir:`` folder must exist. An open_clip tag
    must be in the local cache, or the hub must be reachable: with
    ``HF_HUB_OFFLINE=1`` open_clip fails at once, and without it open_clip
    waits ~45 s before failing; here an unreachable hub is detected in a few
    seconds.
    """
    arch = arch_of(zoo_kwargs)
    pretrained = (zoo_kwargs or {}).get("pretrained")
    if arch.startswith(LOCAL_DIR_PREFIX):
        folder = pathlib.Path(arch[len(LOCAL_DIR_PREFIX):])
        cfg = folder / "open_clip_config.json"
        if not cfg.is_file():
            raise BulkLabelingError(
                "The model folder '%s' is gone (no open_clip_config.json)"
                % folder
            )
        if not any(
            p.exists() for pat in ("*.safetensors", "*.bin", "*.pth")
            for p in folder.glob(pat)
        ):
            raise BulkLabelingError(
                "The checkpoint of model folder '%s' is missing (was the "
                "checkpoint file moved or deleted?)" % folder
            )
        return

    if pretrained is None:
        pretrained = DEFAULT_PRETRAINED
    if os.path.isfile(pretrained):
        return
    if os.sep in pretrained:
        raise BulkLabelingError("Checkpoint file '%s' does not exist" % pretrained)

    register_configs()
    import open_clip

    if arch not in open_clip.list_models():
        raise BulkLabelingError(
            "Unknown open_clip architecture '%s'. For a custom architecture "
            "pass model_config=<its open_clip JSON config> and "
            "pretrained=<a local checkpoint file>" % arch
        )

    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise BulkLabelingError(
            "'%s' is neither an open_clip tag of %s (%s) nor a local "
            "checkpoint file" % (pretrained, arch, ", ".join(tags) or "none")
        )

    if _cached_weights(cfg):
        return

    hint = (
        "The weights '%s' of %s are not in the local cache and %s. Download "
        "them on a machine with access to the model hub, or use a local "
        "checkpoint: pretrained='/path/to/checkpoint.pt' (plus "
        "model_config='/path/to/arch.json' for a custom architecture)"
    )
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        raise BulkLabelingError(
            hint % (pretrained, arch, "HF_HUB_OFFLINE is set")
        )

    host = _hub_host(cfg)
    if not _reachable(host):
        raise BulkLabelingError(
            hint % (pretrained, arch, "the model hub (%s) cannot be reached" % host)
        )


def _env_true(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cached_weights(cfg):
    """The local file of an open_clip pretrained config, if downloaded."""
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None

    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            model_id, filename = os.path.split(hub)
            names = [filename] if filename else [
                "open_clip_model.safetensors",
                "open_clip_pytorch_model.bin",
            ]
            if filename and filename.endswith(".bin"):
                names.insert(0, filename[:-4] + ".safetensors")
            for name in names:
                try:
                    path = try_to_load_from_cache(model_id, name)
                except Exception:
                    path = None
                if isinstance(path, str) and os.path.isfile(path):
                    return path

    url = cfg.get("url", "")
    if url:
        path = os.path.expanduser(os.path.join("~/.cache/clip", os.path.basename(url)))
        if os.path.isfile(path):
            return path

    return None


def _hub_host(cfg):
    if cfg.get("hf_hub"):
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        return endpoint.split("://", 1)[-1].split("/", 1)[0]
    url = cfg.get("url", "")
    return url.split("://", 1)[-1].split("/", 1)[0] or "huggingface.co"


def _reachable(host, timeout=_HUB_PROBE_TIMEOUT):
    """Whether a TCP connection to ``host`` (port 443) opens within
    ``timeout`` seconds, DNS included (run in a thread: name resolution
    has no timeout of its own)."""
    name, _, port = host.partition(":")
    result = []

    def probe():
        try:
            with socket.create_connection((name, int(port or 443)), timeout=timeout):
                result.append(True)
        except Exception:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def default_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


#: Numeric precisions of the image tower. ``"auto"``: fp16 on CUDA; on CPU,
#: bf16 where the CPU computes it natively (AVX512-BF16 or AMX: about 2x
#: fp32, embeddings within 1e-4 cosine of fp32), else fp32
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_bf16():
    """Whether this CPU computes bf16 natively (oneDNN's own check)."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def resolve_precision(precision, device):
    """The precision (``"fp32"``, ``"bf16"`` or ``"fp16"``) that
    ``precision`` means on ``device``, or a clear error."""
    precision = (precision or "auto").strip().lower()
    if precision not in PRECISIONS:
        raise BulkLabelingError(
            "precision must be one of %s, not %r"
            % (", ".join(PRECISIONS), precision)
        )

    on_cuda = getattr(device, "type", device) == "cuda"
    if precision == "auto":
        if on_cuda:
            return "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and not on_cuda:
        raise BulkLabelingError(
            "precision='fp16' needs a CUDA device; on CPU use 'bf16' (fast "
            "where the CPU supports it) or 'fp32'"
        )
    return precision


_ZOO_MODELS = {}
_zoo_lock = threading.Lock()


def load_zoo_model(zoo_kwargs, device=None):
    """Loads (once per process and device) the ``open-clip-torch`` zoo model
    that an index stores, after :func:`check_weights`.

    Returns:
        a :class:`fiftyone.utils.open_clip.TorchOpenClipModel`
    """
    zoo_kwargs = dict(zoo_kwargs or {})
    key = (json.dumps(zoo_kwargs, sort_keys=True), device)
    with _zoo_lock:
        model = _ZOO_MODELS.get(key)
        if model is not None:
            return model

        check_weights(zoo_kwargs)
        register_configs()
        import fiftyone.zoo as foz

        kwargs = dict(zoo_kwargs)
        if device:
            kwargs["device"] = device
        try:
            model = foz.load_zoo_model(ZOO_MODEL, **kwargs)
        except BulkLabelingError:
            raise
        except Exception as e:
            raise BulkLabelingError(
                "Could not load the open_clip model %s: %s. Check the "
                "architecture name, the checkpoint (pretrained=<path>) and, "
                "for a custom architecture, model_config=<its JSON config>"
                % (arch_of(zoo_kwargs), _short(e))
            )
        _ZOO_MODELS[key] = model
        return model


def _short(e, limit=400):
    text = str(e).strip().splitlines()
    text = text[0] if text else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def clear_model_cache():
    with _zoo_lock:
        _ZOO_MODELS.clear()


def _bf16_image_tower(zoo_model):
    """A bf16 copy of a zoo model's image tower, made once per model. The
    zoo model itself stays fp32: FiftyOne embeds text prompts with it."""
    import copy

    import torch

    with _zoo_lock:
        tower = getattr(zoo_model, "_bulk_labeling_bf16_tower", None)
        if tower is None:
            tower = copy.deepcopy(zoo_model._model.visual).to(torch.bfloat16)
            tower.eval()
            zoo_model._bulk_labeling_bf16_tower = tower
        return tower


class Embedder(object):
    """Image and text embeddings from an ``open-clip-torch`` zoo model, with
    a fast image pipeline.

    Images are read, decoded and preprocessed (open_clip's own transform) in
    DataLoader workers while the model runs batches under
    ``torch.inference_mode``, in the precision of :func:`resolve_precision`
    (fp16 autocast on CUDA, a bf16 copy of the image tower on CPUs that
    compute bf16 natively). Embeddings are L2 normalised float32.

    Args:
        zoo_model: a :class:`fiftyone.utils.open_clip.TorchOpenClipModel`
        precision ("auto"): one of :data:`PRECISIONS`
    """

    def __init__(self, zoo_model, precision="auto"):
        self.zoo_model = zoo_model
        self.net = zoo_model._model
        self.preprocess = zoo_model._clip_preprocess
        self.device = zoo_model.device
        self.precision = resolve_precision(precision, self.device)
        self._bf16_tower = None
        if self.precision == "bf16" and self.device.type != "cuda":
            # On CPU, autocast casts every op (slower than fp32, measured);
            # bf16 weights run at about 2x fp32
            self._bf16_tower = _bf16_image_tower(zoo_model)

    @classmethod
    def load(cls, zoo_kwargs, device=None, precision="auto"):
        return cls(load_zoo_model(zoo_kwargs, device=device), precision)

    def _encode(self, batch):
        import torch

        batch = batch.to(self.device, non_blocking=True)
        if self._bf16_tower is not None:
            out = self._bf16_tower(batch.to(torch.bfloat16))
        elif self.precision == "fp32":
            out = self.net.encode_image(batch)
        else:
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            with torch.autocast(self.device.type, dtype=dtype):
                out = self.net.encode_image(batch)
        return torch.nn.functional.normalize(out.float(), dim=-1).cpu().numpy()

    def embed_tensors(self, batch):
        import torch

        with torch.inference_mode():
            return self._encode(batch)

    def embed_images(self, images):
        """Embeds PIL images; returns an ``n x d`` float32 array."""
        import torch

        batch = torch.stack([self.preprocess(img.convert("RGB")) for img in images])
        return self.embed_tensors(batch)

    def embed_texts(self, texts):
        """Embeds text prompts exactly as fiftyone-brain does for the index
        (FiftyOne's zoo model prepends its ``text_prompt``)."""
        import numpy as np

        with self.zoo_model:
            vectors = self.zoo_model.embed_prompts(list(texts))
        vectors = np.asarray(vectors, dtype=np.float32)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def iter_embed_files(self, filepaths, batch_size=None, num_workers=None):
        """Embeds image files in batches.

        Yields:
            ``(indices, embeddings, failed)`` per batch: the positions in
            ``filepaths`` that were embedded, their ``len(indices) x d``
            float32 embeddings, and the positions whose image could not be
            read
        """
        import torch
        from torch.utils.data import DataLoader

        batch_size = batch_size or default_batch_size(self.device)
        if num_workers is None:
            num_workers = default_num_workers(self.device)
        if not filepaths:
            return

        loader = DataLoader(
            _ImageFiles(list(filepaths), self.preprocess),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if num_workers else None,
            persistent_workers=False,
        )
        with torch.inference_mode():
            for indices, batch, failed in loader:
                embeddings = self._encode(batch) if len(indices) else None
                yield indices, embeddings, failed


def default_batch_size(device):
    return 64 if getattr(device, "type", device) == "cuda" else 32


def default_num_workers(device):
    cpus = os.cpu_count() or 1
    if getattr(device, "type", device) == "cuda":
        return max(1, min(8, cpus - 1))
    # On CPU the model needs the cores. With 2 or fewer, decoding between
    # batches (~2 ms an image) costs less than a worker competing with the
    # model's threads (measured: 0.98x vs 0.87x model-only, see
    # docs/BENCHMARKS.md); with more, one worker keeps decoding ahead
    if cpus <= 2:
        return 0
    return 1 if cpus <= 4 else min(4, cpus // 4)


class _ImageFiles(object):
    """Reads, decodes and preprocesses one image file (in a worker)."""

    def __init__(self, filepaths, preprocess):
        self.filepaths = filepaths
        self.preprocess = preprocess

    def __len__(self):
        return len(self.filepaths)

    def __getitem__(self, index):
        from PIL import Image

        try:
            with Image.open(self.filepaths[index]) as img:
                size = _preprocess_size(self.preprocess)
                if size and img.format == "JPEG":
                    # Let libjpeg decode at a reduced scale when the image
                    # is much larger than the model's input
                    img.draft("RGB", (size * 2, size * 2))
                img = img.convert("RGB")
            return index, self.preprocess(img)
        except Exception:
            return index, None


def _preprocess_size(preprocess):
    for t in getattr(preprocess, "transforms", []):
        size = getattr(t, "size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, (tuple, list)) and size:
            return max(size)
    return None


def _collate(items):
    import torch

    ok = [(i, t) for i, t in items if t is not None]
    failed = [i for i, t in items if t is None]
    if not ok:
        return [], torch.empty(0), failed
    return [i for i, _ in ok], torch.stack([t for _, t in ok]), failed
