"""Smart search: open_clip embeddings in fiftyone-brain similarity indexes.

*   :func:`iter_build_index` / :func:`build_similarity_index` embed the images
    with a fast pipeline (see :class:`bulk_labeling.core.models.Embedder`) and
    store them in a fiftyone-brain similarity index (any backend; ``sklearn``
    by default). The index records its model as the zoo model
    ``"open-clip-torch"`` plus ``model_kwargs``, so text prompts work in any
    later process: the App, delegated workers, plain
    ``dataset.sort_by_similarity("a red car", brain_key=...)``. With
    ``num_shards > 1`` the embedding is split into shards, run by delegated
    workers in parallel and assembled into the same index (see
    :mod:`bulk_labeling.core.sharding`).
*   Building again with the same brain key only embeds what is missing and
    drops deleted samples (:func:`update_similarity_index`);
    :func:`sync_index` does the same for a few samples at once, right after an
    upload, or says why the index is stale and how to update it.
*   :func:`search` / :func:`find_similar` rank samples by cosine similarity to
    samples, an image or a text prompt and return a view of the results, in
    rank order, with each score in a ``similarity`` field computed by the view
    (nothing is written on the samples, so concurrent searches never clobber
    each other's scores and ``last_modified_at`` is left alone).

For the ``sklearn`` backend the query path keeps an L2-normalised float32
copy of the vectors per process (refreshed when the index is saved again) and
answers with one matrix-vector product; other backends answer through their
own nearest-neighbour search.
"""

import collections
import dataclasses
import logging
import numbers
import threading
import time

from bson import ObjectId

from . import database as db
from . import models
from .errors import BulkLabelingError
from .progress import Progress

logger = logging.getLogger(__name__)

DEFAULT_BRAIN_KEY = "bulk_labeling_clip"
DEFAULT_BACKEND = "sklearn"
DEFAULT_K = 50
#: The most results one search returns (the view selects them by id)
MAX_K = 10_000
#: The field, computed by the result view, that shows each score
SCORE_FIELD = "similarity"

#: At most this many new samples are embedded inline by :func:`sync_index`
#: (i.e. during an upload); more make it report the index as stale
SYNC_MAX_SAMPLES = {"cpu": 256, "cuda": 4096}
#: A sklearn index is stored as one JSON blob rewritten on every save; above
#: this many stored values (vectors x dims) an inline sync is not cheap
SKLEARN_SYNC_MAX_VALUES = 3_000_000
#: Decimals kept for vectors stored by the sklearn backend (stored as JSON:
#: 4 decimals make the blob ~2.5x smaller than float32 reprs; cosine
#: similarities move by < 1e-3)
SKLEARN_DECIMALS = 4
#: During a long build, the index is saved this often (seconds), so an
#: interrupted build resumes where it stopped
SAVE_EVERY_SECONDS = 600
#: Vectors added to the index per call while building
ADD_CHUNK = 8192


def _fob():
    import fiftyone.brain as fob

    return fob


def _root_dataset(sample_collection):
    db.require_sample_view(sample_collection)
    return sample_collection._root_dataset


def _require_images(dataset):
    if dataset.media_type not in (None, "image"):
        raise BulkLabelingError(
            "Smart search indexes images; this dataset's media type is '%s'"
            % dataset.media_type
        )


# ---------------------------------------------------------------- indexes


def _runs_coll():
    return db.get_db()["runs"]


def _run_doc(dataset, brain_key):
    """The stored run document of a brain run (fresh from the database,
    whatever this process has cached), or None."""
    return _runs_coll().find_one(
        {"_dataset_id": dataset._doc.id, "key": brain_key},
        {"config": 1, "results": 1, "timestamp": 1},
    )


def _similarity_docs(dataset):
    docs = _runs_coll().find(
        {"_dataset_id": dataset._doc.id},
        {"key": 1, "config": 1, "results": 1, "timestamp": 1},
    )
    brain_keys = set(dataset._doc.brain_methods or {})
    out = []
    for doc in docs:
        cfg = doc.get("config") or {}
        if cfg.get("type") != "similarity":
            continue
        if doc.get("key") not in brain_keys:
            # Created by another process since this one loaded the dataset
            dataset.reload()
            brain_keys = set(dataset._doc.brain_methods or {})
            if doc.get("key") not in brain_keys:
                continue
        out.append(doc)
    return sorted(out, key=lambda d: d["key"])


def list_indexes(dataset):
    """Returns the dataset's similarity indexes:
    ``[{"brain_key", "backend", "model", "model_kwargs", "supports_prompts"}]``."""
    dataset = _root_dataset(dataset)
    return [
        {
            "brain_key": doc["key"],
            "backend": doc["config"].get("method"),
            "model": doc["config"].get("model"),
            "model_kwargs": doc["config"].get("model_kwargs"),
            "supports_prompts": bool(doc["config"].get("supports_prompts")),
        }
        for doc in _similarity_docs(dataset)
    ]


def resolve_brain_key(dataset, brain_key=None):
    """The brain key to search: ``brain_key`` if given (it must exist),
    else :data:`DEFAULT_BRAIN_KEY`, else the dataset's only similarity
    index."""
    dataset = _root_dataset(dataset)
    keys = [d["key"] for d in _similarity_docs(dataset)]
    if brain_key:
        if brain_key not in keys:
            raise BulkLabelingError(
                "Dataset '%s' has no similarity index '%s'%s. Build one with "
                "the 'Build similarity index' operator or "
                "bulk_labeling.build_similarity_index(dataset, brain_key='%s')"
                % (dataset.name, brain_key,
                   " (it has: %s)" % ", ".join(keys) if keys else "",
                   brain_key)
            )
        return brain_key
    if DEFAULT_BRAIN_KEY in keys:
        return DEFAULT_BRAIN_KEY
    if len(keys) == 1:
        return keys[0]
    if not keys:
        raise BulkLabelingError(
            "Dataset '%s' has no similarity index yet. Build one first with "
            "the 'Build similarity index' operator or "
            "bulk_labeling.build_similarity_index(dataset)" % dataset.name
        )
    raise BulkLabelingError(
        "Dataset '%s' has several similarity indexes (%s): choose one with "
        "brain_key" % (dataset.name, ", ".join(keys))
    )


def _load_results(dataset, brain_key):
    """Loads an index fresh from the database (never a stale cached copy:
    another process may have updated it)."""
    if brain_key not in (dataset._doc.brain_methods or {}):
        dataset.reload()
    return dataset.load_brain_results(brain_key, cache=False)


def _index_ids(results):
    """The sample ids that an index holds, or None if it cannot list them."""
    ids = getattr(results, "sample_ids", None)
    if ids is None:
        # fiftyone-brain's LanceDB index lists none; its table has them
        table = getattr(results, "table", None)
        if table is not None and "sample_id" in table.schema.names:
            ids = table.to_arrow().column("sample_id").to_pylist()
        elif getattr(results.config, "method", None) == "lancedb":
            ids = []  # no table yet: an empty index
    return None if ids is None else [str(i) for i in ids]


def _save(dataset, brain_key, results, token):
    """Saves an index unless another process saved it since ``token`` was
    read (then returns False: reload and redo)."""
    doc = _run_doc(dataset, brain_key)
    if doc is None:
        raise BulkLabelingError(
            "Similarity index '%s' was deleted meanwhile" % brain_key
        )
    if doc.get("results") != token:
        return False
    results.save()
    _invalidate(dataset, brain_key)
    return True


def _to_store(embeddings, backend):
    import numpy as np

    if backend == "sklearn":
        return np.round(embeddings.astype(np.float64), SKLEARN_DECIMALS)
    return embeddings


def _ids_for(ids, backend):
    """Sample ids as the backend's ``add_to_index`` takes them: fiftyone-brain's
    LanceDB backend concatenates them to a Python list, so an array there
    breaks (``list + ndarray``) once its table holds vectors."""
    import numpy as np

    return list(ids) if backend == "lancedb" else np.array(ids)


def _zoo_kwargs(doc):
    cfg = doc["config"]
    if cfg.get("model") != models.ZOO_MODEL:
        return None
    return dict(cfg.get("model_kwargs") or {})


def _check_build_args(batch_size, num_workers):
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise BulkLabelingError("batch_size must be a positive integer")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise BulkLabelingError("num_workers must be an integer >= 0")


def _check_device(device):
    if device in (None, "", "auto"):
        return None
    import torch

    try:
        dev = torch.device(device)
    except Exception:
        raise BulkLabelingError("Unknown device '%s'" % device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BulkLabelingError("device='%s' but CUDA is not available" % device)
    return str(dev)


def _check_num_shards(num_shards, count):
    """Validates ``num_shards`` against the dataset's ``count`` samples."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, numbers.Integral):
        raise BulkLabelingError(
            "num_shards must be an integer (got %r)" % (num_shards,))
    num_shards = int(num_shards)
    if num_shards < 1:
        raise BulkLabelingError("num_shards must be at least 1")
    if num_shards > count:
        raise BulkLabelingError(
            "num_shards=%d is more than the dataset's %d sample(s); use at "
            "most one shard per sample" % (num_shards, count))
    return num_shards


@dataclasses.dataclass
class _BuildArgs:
    """A validated :func:`iter_build_index` request."""

    brain_key: str
    backend: str
    spec: models.ModelSpec
    zoo_kwargs: dict
    existing: dict
    device: str
    precision: str
    overwrite: bool
    num_shards: int


def _prepare_build(dataset, model, pretrained, model_config, brain_key,
                   backend, batch_size, num_workers, device, overwrite,
                   num_shards, precision="auto"):
    """Validates a build request without writing anything."""
    _require_images(dataset)
    brain_key = (brain_key or DEFAULT_BRAIN_KEY).strip()
    backend = backend or DEFAULT_BACKEND
    _check_build_args(batch_size, num_workers)
    device = _check_device(device)
    models.resolve_precision(precision, device or models.default_device())
    spec = models.resolve(model, pretrained, model_config)
    zoo_kwargs = spec.zoo_kwargs()

    count = dataset.count()
    if count == 0:
        raise BulkLabelingError("Dataset '%s' has no samples to index" % dataset.name)
    num_shards = _check_num_shards(num_shards, count)

    existing = _run_doc(dataset, brain_key)
    if existing is not None and not overwrite:
        cfg = existing["config"]
        if cfg.get("type") != "similarity":
            raise BulkLabelingError(
                "Brain key '%s' is used by a %s run; choose another brain_key"
                % (brain_key, cfg.get("type"))
            )
        if (_zoo_kwargs(existing) != zoo_kwargs) or cfg.get("method") != backend:
            raise BulkLabelingError(
                "Similarity index '%s' already exists with another model or "
                "backend (%s, %s). Pass overwrite=True to rebuild it, or "
                "choose another brain_key"
                % (brain_key, cfg.get("model_kwargs") or cfg.get("model"),
                   cfg.get("method"))
            )

    # Before anything slow: an unreachable hub tag fails in seconds
    models.check_weights(zoo_kwargs)

    import fiftyone.brain as fb

    if backend not in fb.brain_config.similarity_backends:
        raise BulkLabelingError(
            "Unknown similarity backend '%s'; available: %s"
            % (backend, ", ".join(sorted(fb.brain_config.similarity_backends)))
        )

    return _BuildArgs(brain_key, backend, spec, zoo_kwargs, existing,
                      device, precision or "auto", bool(overwrite), num_shards)


def iter_build_index(dataset, model=models.DEFAULT_MODEL,
                     pretrained=models.DEFAULT_PRETRAINED, model_config=None,
                     brain_key=DEFAULT_BRAIN_KEY, backend=DEFAULT_BACKEND,
                     batch_size=None, num_workers=None, device=None,
                     overwrite=False, num_shards=1, launch_shards=None,
                     precision="auto"):
    """Builds (or brings up to date) a similarity index of CLIP image
    embeddings. A generator of :class:`Progress`; see
    :func:`build_similarity_index`.

    With ``num_shards > 1`` the work is split into shards (see
    :mod:`bulk_labeling.core.sharding`): ``launch_shards(build_id,
    num_shards, label)`` queues them as delegated operations and returns
    their ids; without it they run inline, one after another.
    """
    dataset = _root_dataset(dataset)
    args = _prepare_build(dataset, model, pretrained, model_config, brain_key,
                          backend, batch_size, num_workers, device, overwrite,
                          num_shards, precision)
    if args.num_shards > 1:
        from . import sharding

        return (yield from sharding.iter_build_sharded(
            dataset, args, batch_size=batch_size, num_workers=num_workers,
            device=device, launch=launch_shards))

    brain_key, backend, spec = args.brain_key, args.backend, args.spec
    zoo_kwargs, existing = args.zoo_kwargs, args.existing
    results = None
    if existing is not None and not overwrite:
        results = _load_results(dataset, brain_key)
    todo, gone = _plan(dataset, results)

    yield Progress(0, len(todo), "Loading model %s" % spec.describe())
    embedder = load_embedder(spec, device=args.device, precision=args.precision)

    created = results is None
    if existing is not None and overwrite:
        dataset.delete_brain_run(brain_key)
        _invalidate(dataset, brain_key)
    if created:
        results = _create_index(dataset, brain_key, backend, embedder, zoo_kwargs)

    summary = yield from _iter_fill(
        dataset, brain_key, results, embedder, todo, gone, batch_size,
        num_workers,
    )
    summary.update(model=spec.to_dict(), model_kwargs=zoo_kwargs,
                   created=created)
    return summary


def load_embedder(spec, device=None, precision="auto"):
    """Loads the :class:`bulk_labeling.core.models.Embedder` of a
    :class:`bulk_labeling.core.models.ModelSpec`."""
    if spec.model_config:
        models.register_configs([spec.model_config])
    return models.Embedder.load(spec.zoo_kwargs(), device=device,
                                precision=precision)


def _plan(dataset, results):
    """``(todo, gone)``: the ``(id, filepath)`` of samples to embed, and the
    ids of deleted samples still in the index (``results``; None for a new
    index)."""
    ids, paths = dataset.values(["id", "filepath"])
    index_ids = _index_ids(results) if results is not None else []
    if index_ids is None:
        # A backend that cannot list its ids: embed everything again
        return list(zip(ids, paths)), []
    current = set(ids)
    gone = [i for i in index_ids if i not in current]
    indexed = set(index_ids)
    return [(i, p) for i, p in zip(ids, paths) if i not in indexed], gone


def _create_index(dataset, brain_key, backend, embedder, zoo_kwargs):
    """Registers an empty index whose stored model is the zoo model
    ``open-clip-torch`` with ``zoo_kwargs``: exactly the config that
    ``compute_similarity(model="open-clip-torch", model_kwargs=...)``
    stores (so any later process can reload the model and embed prompts),
    without loading the model a second time."""
    fob = _fob()
    results = fob.compute_similarity(
        dataset,
        embeddings=False,
        brain_key=brain_key,
        backend=backend,
    )
    results.config.model = models.ZOO_MODEL
    results.config.model_kwargs = dict(zoo_kwargs)
    results.config.supports_prompts = True
    results.save_config()
    # What compute_similarity() sets on the results it returns when given a
    # model name, so this process's cached copy answers prompts too
    results._model = embedder.zoo_model
    results._supports_prompts = True
    return results


def _iter_fill(dataset, brain_key, results, embedder, todo, gone,
               batch_size, num_workers):
    """Embeds ``todo`` (see :func:`_plan`) into the index, drops ``gone``,
    and saves the index."""
    start = time.time()
    backend = results.config.method
    removed = 0
    if gone:
        results.remove_from_index(sample_ids=gone, reload=False)
        removed = len(gone)

    def add(ids, vectors):
        results.add_to_index(_to_store(vectors, backend),
                             _ids_for(ids, backend), reload=False)

    failed = yield from iter_embed(embedder, todo, batch_size, num_workers,
                                   add, ADD_CHUNK, checkpoint=results.save)
    added = len(todo) - len(failed)
    if added or removed:
        results.save()
    _invalidate(dataset, brain_key)
    return build_summary(brain_key, results, added, removed, len(failed),
                         failed, time.time() - start)


def iter_embed(embedder, todo, batch_size, num_workers, flush, chunk,
               checkpoint=None):
    """Embeds the images of ``todo`` (``(id, filepath)`` pairs, in order). A
    generator of :class:`Progress`.

    Args:
        flush: called as ``flush(ids, vectors)`` with every ``chunk`` or so
            embedded images, and with the rest at the end
        chunk: how many vectors to pass to ``flush`` at once
        checkpoint (None): called (after a flush) every
            :data:`SAVE_EVERY_SECONDS`, so an interrupted run keeps its work

    Returns:
        the ids of the images that could not be read
    """
    import numpy as np

    total = len(todo)
    done = 0
    failed = []
    pending_ids, pending_vecs = [], []
    last_save = time.time()

    def flush_pending():
        if pending_ids:
            flush(list(pending_ids), np.concatenate(pending_vecs))
            pending_ids.clear()
            pending_vecs.clear()

    yield Progress(0, total, "Embedding images")
    todo_ids = [i for i, _ in todo]
    for indices, embeddings, bad in embedder.iter_embed_files(
        [p for _, p in todo], batch_size=batch_size, num_workers=num_workers
    ):
        if len(indices):
            pending_ids.extend(todo_ids[j] for j in indices)
            pending_vecs.append(embeddings)
        failed.extend(todo_ids[j] for j in bad)
        done += len(indices) + len(bad)
        if len(pending_ids) >= chunk:
            flush_pending()
        if checkpoint is not None and time.time() - last_save > SAVE_EVERY_SECONDS:
            flush_pending()
            checkpoint()
            last_save = time.time()
        yield Progress(done, total, "Embedding images")

    flush_pending()
    return failed


def build_summary(brain_key, results, added, removed, failed, failed_ids,
                  seconds):
    """The result dict of a build: ``failed`` images could not be read,
    e.g. ``failed_ids``."""
    if failed:
        logger.warning(
            "%d image(s) could not be read and were not indexed, e.g. %s",
            failed, ", ".join(failed_ids[:5]),
        )

    return {
        "brain_key": brain_key,
        "backend": results.config.method,
        "indexed": int(results.total_index_size),
        "added": added,
        "removed": removed,
        "failed": failed,
        "failed_ids": failed_ids[:20],
        "seconds": round(seconds, 2),
        "images_per_second": round(added / seconds, 2) if seconds else None,
    }


def build_similarity_index(dataset, model=models.DEFAULT_MODEL,
                           pretrained=models.DEFAULT_PRETRAINED,
                           model_config=None, brain_key=DEFAULT_BRAIN_KEY,
                           backend=DEFAULT_BACKEND, batch_size=None,
                           num_workers=None, device=None, overwrite=False,
                           num_shards=1, precision="auto", progress=None):
    """Computes CLIP image embeddings with open_clip and stores them in a
    fiftyone-brain similarity index that supports text prompts.

    If the index already exists with the same model and backend, only the
    samples missing from it are embedded and deleted samples are removed.

    Example::

        import bulk_labeling as bl

        bl.build_similarity_index(dataset)  # ViT-B-32, openai weights
        bl.build_similarity_index(
            dataset, model="bl-tiny-clip",
            pretrained="/models/bl-tiny-clip.pt",
            model_config="/models/bl-tiny-clip.json",
        )
        view = bl.find_similar(dataset, text="a red car", k=25)

    Args:
        dataset: a dataset (or a view of it: the whole dataset is indexed)
        model ("ViT-B-32"): an open_clip architecture, or
            ``"local-dir:/path"``
        pretrained ("openai"): an open_clip tag, or the path of a local
            checkpoint file
        model_config (None): the path of an open_clip JSON config defining a
            custom architecture (named by its file name)
        brain_key ("bulk_labeling_clip"): the index's brain key
        backend ("sklearn"): any fiftyone-brain similarity backend
        batch_size (None): images per batch (default 32 on CPU, 64 on GPU)
        num_workers (None): image-decoding worker processes
        device (None): ``"cuda"``, ``"cpu"``...; default: cuda if available
        overwrite (False): rebuild an existing index from scratch
        num_shards (1): split the embedding into this many shards. Here they
            run one after another in this process (the same result as one
            shard); to run them in parallel on ``fiftyone delegated launch``
            workers, queue the ``build_similarity_index`` operator delegated
            (see docs/SCALE.md)
        precision ("auto"): the image tower's precision: ``"fp32"``,
            ``"bf16"``, ``"fp16"`` (CUDA only) or ``"auto"`` (fp16 on CUDA;
            bf16 on CPUs that compute it natively, about 2x fp32; else
            fp32). Embeddings agree with fp32 to about 1e-4 cosine
        progress (None): whether to render a progress bar, or a callback

    Returns:
        a dict: ``brain_key``, ``indexed``, ``added``, ``removed``,
        ``failed`` (images that could not be read), ``seconds``... (plus
        ``num_shards``, ``build_id`` and ``shard_operations`` when sharded)
    """
    from .progress import run

    return run(
        iter_build_index(
            dataset, model=model, pretrained=pretrained,
            model_config=model_config, brain_key=brain_key, backend=backend,
            batch_size=batch_size, num_workers=num_workers, device=device,
            overwrite=overwrite, num_shards=num_shards, precision=precision,
        ),
        progress=progress,
    )


def iter_update_index(dataset, brain_key=None, batch_size=None,
                      num_workers=None, device=None, precision="auto"):
    """Brings an existing index up to date with its stored model. A
    generator of :class:`Progress`."""
    dataset = _root_dataset(dataset)
    brain_key = resolve_brain_key(dataset, brain_key)
    doc = _run_doc(dataset, brain_key)
    zoo_kwargs = _zoo_kwargs(doc)
    if zoo_kwargs is None:
        raise BulkLabelingError(
            "Similarity index '%s' was not built with an open_clip model; "
            "rebuild it with build_similarity_index" % brain_key
        )
    _check_build_args(batch_size, num_workers)
    device = _check_device(device)
    models.resolve_precision(precision, device or models.default_device())
    results = _load_results(dataset, brain_key)
    todo, gone = _plan(dataset, results)
    yield Progress(0, len(todo), "Loading model")
    embedder = models.Embedder.load(zoo_kwargs, device=device,
                                    precision=precision)
    summary = yield from _iter_fill(
        dataset, brain_key, results, embedder, todo, gone, batch_size,
        num_workers,
    )
    summary.update(model_kwargs=zoo_kwargs, created=False)
    return summary


def update_similarity_index(dataset, brain_key=None, batch_size=None,
                            num_workers=None, device=None, precision="auto",
                            progress=None):
    """Embeds the samples missing from an index (with the index's own model)
    and removes deleted samples from it."""
    from .progress import run

    return run(
        iter_update_index(dataset, brain_key=brain_key, batch_size=batch_size,
                          num_workers=num_workers, device=device,
                          precision=precision),
        progress=progress,
    )


def index_status(dataset, brain_key=None):
    """Compares an index with its dataset.

    Returns:
        a dict: ``brain_key``, ``backend``, ``model_kwargs``, ``indexed``
        (vectors in the index), ``samples``, ``missing`` (samples not in the
        index), ``deleted`` (vectors of deleted samples), ``stale`` and, when
        stale, ``message`` (what to do)
    """
    dataset = _root_dataset(dataset)
    brain_key = resolve_brain_key(dataset, brain_key)
    doc = _run_doc(dataset, brain_key)
    results = _load_results(dataset, brain_key)
    ids = set(dataset.values("id"))
    index_ids = _index_ids(results)
    if index_ids is None:
        indexed = int(results.total_index_size)
        missing = max(0, len(ids) - indexed)
        deleted = max(0, indexed - len(ids))
    else:
        indexed = len(index_ids)
        index_set = set(index_ids)
        missing = len(ids - index_set)
        deleted = len(index_set - ids)
    status = {
        "brain_key": brain_key,
        "backend": doc["config"].get("method"),
        "model_kwargs": doc["config"].get("model_kwargs"),
        "indexed": indexed,
        "samples": len(ids),
        "missing": missing,
        "deleted": deleted,
        "stale": bool(missing or deleted),
    }
    if status["stale"]:
        status["message"] = _stale_message(brain_key, missing, deleted)
    return status


def _stale_message(brain_key, missing, deleted=0, reason=None):
    parts = []
    if missing:
        parts.append("%d sample(s) are not in it" % missing)
    if deleted:
        parts.append("it holds %d deleted sample(s)" % deleted)
    return (
        "Similarity index '%s' is stale: %s%s. Update it with the 'Build "
        "similarity index' operator (same brain key: it only embeds the "
        "missing samples, and can run delegated) or "
        "bulk_labeling.update_similarity_index(dataset, brain_key='%s')"
        % (brain_key, " and ".join(parts) or "it is out of date",
           " (%s)" % reason if reason else "", brain_key)
    )


# ------------------------------------------------------------------- sync


def sync_index(dataset, added_ids=None, deleted_ids=None, brain_key=None,
               max_immediate=None):
    """Keeps the dataset's similarity indexes current after samples were
    added or deleted.

    Deleted samples are removed from the index. Added samples are embedded
    with the index's model and added when that is cheap (at most
    ``max_immediate`` images: 256 on CPU, 4096 on GPU by default, and a
    sklearn index small enough to re-save quickly); otherwise nothing is
    embedded and a message says the index is stale and how to update it.
    With neither ``added_ids`` nor ``deleted_ids``, the whole dataset is
    reconciled with the index.

    Args:
        dataset: the dataset
        added_ids (None): ids of samples just added
        deleted_ids (None): ids of samples just deleted
        brain_key (None): one index; default: every similarity index
        max_immediate (None): the most images to embed now

    Returns:
        None when every index is current, else a message for the user
    """
    dataset = _root_dataset(dataset)
    if brain_key:
        keys = [resolve_brain_key(dataset, brain_key)]
    else:
        keys = [d["key"] for d in _similarity_docs(dataset)]

    messages = []
    for key in keys:
        try:
            message = _sync_one(dataset, key, added_ids, deleted_ids, max_immediate)
        except BulkLabelingError as e:
            message = "Similarity index '%s' was not updated: %s" % (key, e)
        except Exception as e:  # never fail an upload because of the index
            logger.warning("Could not sync similarity index '%s'", key, exc_info=True)
            message = "Similarity index '%s' was not updated (%s). %s" % (
                key, e, _stale_message(key, 0, reason="sync failed"))
        if message:
            messages.append(message)

    return "\n".join(messages) or None


def _sync_one(dataset, brain_key, added_ids, deleted_ids, max_immediate):
    for _ in range(3):
        doc = _run_doc(dataset, brain_key)
        if doc is None:
            return None
        token = doc.get("results")
        results = _load_results(dataset, brain_key)
        index_ids = _index_ids(results)
        index_set = set(index_ids) if index_ids is not None else None

        if added_ids is None and deleted_ids is None:
            current = set(dataset.values("id"))
            gone = [] if index_set is None else sorted(index_set - current)
            new = sorted(current - index_set) if index_set is not None else []
        else:
            gone = [str(i) for i in (deleted_ids or [])]
            if index_set is not None:
                gone = [i for i in gone if i in index_set]
            new = [str(i) for i in (added_ids or [])]
            if index_set is not None:
                new = [i for i in new if i not in index_set]
            if new:
                new = dataset.select(new).values("id")

        changed = False
        if gone:
            results.remove_from_index(sample_ids=gone, reload=False)
            changed = True

        message = None
        if new:
            message, added = _sync_add(dataset, brain_key, doc, results,
                                       new, max_immediate)
            changed = changed or added

        if not changed:
            return message
        if _save(dataset, brain_key, results, token):
            return message
        # Another process saved the index meanwhile: redo on the new one

    return _stale_message(brain_key, 0, reason="it kept changing during the sync")


def _sync_add(dataset, brain_key, doc, results, new_ids, max_immediate):
    """Embeds and adds ``new_ids`` when cheap. Returns ``(message, added)``."""
    import numpy as np

    zoo_kwargs = _zoo_kwargs(doc)
    if zoo_kwargs is None:
        return _stale_message(
            brain_key, len(new_ids),
            reason="its model is not an open_clip model bulk_labeling can run",
        ), False

    device = models.default_device()
    limit = max_immediate
    if limit is None:
        limit = SYNC_MAX_SAMPLES["cuda" if device == "cuda" else "cpu"]
    if len(new_ids) > limit:
        return _stale_message(
            brain_key, len(new_ids),
            reason="more than %d are not embedded during an upload" % limit,
        ), False

    backend = doc["config"].get("method")
    if backend == "sklearn":
        embeddings = getattr(results, "embeddings", None)
        dims = embeddings.shape[1] if embeddings is not None and embeddings.ndim == 2 else 512
        values = (int(results.total_index_size) + len(new_ids)) * dims
        if values > SKLEARN_SYNC_MAX_VALUES:
            return _stale_message(
                brain_key, len(new_ids),
                reason="re-saving a sklearn index of this size is too slow "
                       "to do during an upload",
            ), False

    embedder = models.Embedder.load(zoo_kwargs)
    paths = dataset.select(new_ids, ordered=True).values("filepath")
    ids, vectors, failed = [], [], []
    for indices, emb, bad in embedder.iter_embed_files(paths, num_workers=0):
        ids.extend(new_ids[j] for j in indices)
        if len(indices):
            vectors.append(emb)
        failed.extend(new_ids[j] for j in bad)

    if ids:
        results.add_to_index(_to_store(np.concatenate(vectors), backend),
                             _ids_for(ids, backend), reload=False)
    message = None
    if failed:
        message = (
            "Similarity index '%s': %d new image(s) could not be read and "
            "were not indexed (e.g. %s)" % (brain_key, len(failed), failed[0])
        )
    return message, bool(ids)


# ------------------------------------------------------------------ query


class QueryIndex(object):
    """What the query path keeps per index and process.

    For the sklearn backend: the vectors as one L2-normalised float32
    matrix and their sample ids. For other backends: the loaded index.
    """

    def __init__(self, brain_key, results, token=None, zoo_kwargs=None):
        import numpy as np

        self.brain_key = brain_key
        self.token = token
        self.zoo_kwargs = zoo_kwargs
        self.backend = results.config.method
        self._id_to_row = None
        self._lock = threading.Lock()
        if self.backend == "sklearn":
            # A copy: never normalise the index's own array in place
            matrix = np.array(results.embeddings, dtype=np.float32, copy=True)
            if matrix.ndim != 2:
                matrix = matrix.reshape(0, 0)
            norms = np.linalg.norm(matrix, axis=1, keepdims=True)
            matrix /= np.maximum(norms, 1e-12)
            self.matrix = matrix
            self.ids = np.asarray([str(i) for i in results.sample_ids])
            self.results = None
        else:
            self.matrix = None
            self.ids = None
            self.results = results

    @classmethod
    def from_results(cls, results, brain_key=None):
        config = results.config
        zoo_kwargs = None
        if config.model == models.ZOO_MODEL:
            zoo_kwargs = dict(config.model_kwargs or {})
        return cls(brain_key or results.key, results, zoo_kwargs=zoo_kwargs)

    @property
    def size(self):
        if self.matrix is not None:
            return self.matrix.shape[0]
        return int(self.results.total_index_size)

    def rows(self, ids):
        """Rows of ``ids`` in the matrix; -1 for ids not in the index."""
        with self._lock:
            if self._id_to_row is None:
                self._id_to_row = {i: r for r, i in enumerate(self.ids)}
        get = self._id_to_row.get
        return [get(i, -1) for i in ids]

    def vectors_of(self, ids):
        import numpy as np

        if self.matrix is not None:
            rows = self.rows(ids)
            missing = [i for i, r in zip(ids, rows) if r < 0]
            return self.matrix[[r for r in rows if r >= 0]], missing
        vectors, found, _ = self.results.get_embeddings(sample_ids=list(ids))
        found = set(str(i) for i in found)
        vectors = np.asarray(vectors, dtype=np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors, [i for i in ids if i not in found]


_QUERY_CACHE = collections.OrderedDict()
_QUERY_CACHE_SIZE = 4
_query_lock = threading.Lock()


def _invalidate(dataset, brain_key):
    with _query_lock:
        _QUERY_CACHE.pop((str(dataset._doc.id), brain_key), None)


def get_query_index(dataset, brain_key):
    """The (per-process cached) :class:`QueryIndex` of an index, reloaded
    when the index was saved again since."""
    doc = _run_doc(dataset, brain_key)
    if doc is None:
        raise BulkLabelingError("Similarity index '%s' does not exist" % brain_key)
    token = doc.get("results")
    cache_key = (str(dataset._doc.id), brain_key)
    with _query_lock:
        cached = _QUERY_CACHE.get(cache_key)
        if cached is not None and cached.token == token:
            _QUERY_CACHE.move_to_end(cache_key)
            return cached

    results = _load_results(dataset, brain_key)
    if results is None:
        raise BulkLabelingError("Similarity index '%s' has no vectors yet" % brain_key)
    index = QueryIndex(brain_key, results, token=token, zoo_kwargs=_zoo_kwargs(doc))
    with _query_lock:
        _QUERY_CACHE[cache_key] = index
        while len(_QUERY_CACHE) > _QUERY_CACHE_SIZE:
            _QUERY_CACHE.popitem(last=False)
    return index


def _strip_search(sample_collection):
    """The collection a previous search's result view was made from: its
    trailing ``Select(ordered) + SetField("similarity")`` stages are
    dropped, so a new search is not confined to the last results."""
    import fiftyone.core.stages as fost

    stages = list(getattr(sample_collection, "_stages", []) or [])
    if (
        len(stages) >= 2
        and isinstance(stages[-1], fost.SetField)
        and stages[-1].field == SCORE_FIELD
        and isinstance(stages[-2], fost.Select)
    ):
        view = sample_collection._dataset.view()
        for stage in stages[:-2]:
            view = view.add_stage(stage)
        return view
    return sample_collection


def _is_full(sample_collection):
    return db.is_full_dataset(sample_collection) or not getattr(
        sample_collection, "_stages", None
    )


def _query_vector(dataset, index, ids, text, image):
    import numpy as np

    given = [x for x in (ids, text, image) if x is not None and x != [] and x != ""]
    if len(given) != 1:
        raise BulkLabelingError(
            "Give exactly one query: sample ids, a text prompt or an image"
        )

    if ids is not None and ids != []:
        ids = [ids] if isinstance(ids, (str, ObjectId)) else list(ids)
        ids = [str(i) for i in ids]
        vectors, missing = index.vectors_of(ids)
        if missing:
            exists = set(dataset.select(missing).values("id"))
            unknown = [i for i in missing if i not in exists]
            if unknown:
                raise BulkLabelingError(
                    "Query sample(s) not in dataset '%s': %s"
                    % (dataset.name, ", ".join(unknown[:5]))
                )
            raise BulkLabelingError(
                "%d query sample(s) are not in the similarity index yet (e.g. "
                "%s). %s" % (len(missing), missing[0],
                             _stale_message(index.brain_key, len(missing)))
            )
        vector = vectors.mean(axis=0)
        return vector / max(float(np.linalg.norm(vector)), 1e-12), "samples"

    if index.zoo_kwargs is None:
        raise BulkLabelingError(
            "Similarity index '%s' has no open_clip model to embed text or "
            "images; query it with sample ids" % index.brain_key
        )
    embedder = models.Embedder.load(index.zoo_kwargs)
    if text is not None:
        text = str(text).strip()
        if not text:
            raise BulkLabelingError("The text query is empty")
        return embedder.embed_texts([text])[0], "text"

    return embedder.embed_images([_open_image(image)])[0], "image"


def _open_image(image):
    """A PIL image from a PIL image, a path, bytes, or the App's upload
    (``{"name", "content"}`` with base64 content, possibly a data URL)."""
    import base64
    import io

    from PIL import Image

    if hasattr(image, "convert"):
        return image
    try:
        if isinstance(image, dict):
            content = image.get("content") or ""
            if "," in content[:100] and content.startswith("data:"):
                content = content.split(",", 1)[1]
            data = base64.b64decode(content)
            return Image.open(io.BytesIO(data)).convert("RGB")
        if isinstance(image, (bytes, bytearray)):
            return Image.open(io.BytesIO(image)).convert("RGB")
        with Image.open(str(image)) as img:
            return img.convert("RGB")
    except Exception as e:
        raise BulkLabelingError("The query image could not be read: %s" % e)


def _check_k(k, min_similarity):
    if k is not None:
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise BulkLabelingError("k must be an integer")
        if k < 1:
            raise BulkLabelingError("k must be at least 1")
        if k > MAX_K:
            raise BulkLabelingError("k can be at most %d" % MAX_K)
    if min_similarity is not None:
        try:
            min_similarity = float(min_similarity)
        except (TypeError, ValueError):
            raise BulkLabelingError("min_similarity must be a number")
        if not -1.0 <= min_similarity <= 1.0:
            raise BulkLabelingError("min_similarity must be between -1 and 1")
    if k is None and min_similarity is None:
        k = DEFAULT_K
    return k, min_similarity


def rank(index, base, vector, k=DEFAULT_K, min_similarity=None,
         with_scores=False):
    """Ranks the samples of ``base`` by cosine similarity to ``vector``.

    Returns:
        ``(ids, scores, info)``: the kept ids and scores in rank order, and
        ``info`` with ``candidates`` (indexed samples searched),
        ``not_indexed`` (samples of ``base`` missing from the index, when
        known) and, with ``with_scores``, ``all_scores`` (every candidate's
        score, for a histogram)
    """
    import numpy as np

    k, min_similarity = _check_k(k, min_similarity)
    limit = k if k is not None else MAX_K
    info = {"not_indexed": None}
    dataset = base._root_dataset

    if index.matrix is None:
        return _rank_external(index, base, vector, limit, min_similarity,
                              with_scores, info)

    full = _is_full(base)
    if full:
        scores = index.matrix @ vector
        row_ids = index.ids
    else:
        view_ids = base.values("id")
        rows = np.asarray(index.rows(view_ids), dtype=np.int64)
        info["not_indexed"] = int((rows < 0).sum())
        rows = rows[rows >= 0]
        scores = index.matrix[rows] @ vector if rows.size else np.zeros(0, np.float32)
        row_ids = index.ids[rows]

    info["candidates"] = int(scores.shape[0])
    if with_scores:
        info["all_scores"] = scores

    eligible = None
    if min_similarity is not None:
        eligible = np.flatnonzero(scores >= min_similarity)

    coll = db.sample_coll(dataset)
    kept_ids, kept_scores = [], []
    pool = eligible if eligible is not None else None
    n = pool.size if pool is not None else scores.shape[0]
    want = min(limit, n)
    take = min(n, want + max(16, want // 8))
    order = None
    while True:
        if pool is not None:
            sub = scores[pool]
            top = pool[_top(sub, take)]
        else:
            top = _top(scores, take)
        order = top
        cand_ids = [str(i) for i in row_ids[order]]
        if full:
            # A deleted sample's vector can linger in a stale index
            exist = set(
                str(d["_id"]) for d in coll.find(
                    {"_id": {"$in": [ObjectId(i) for i in cand_ids]}}, {"_id": 1}
                )
            )
        else:
            exist = None
        kept_ids, kept_scores = [], []
        for i, r in zip(cand_ids, order):
            if exist is None or i in exist:
                kept_ids.append(i)
                kept_scores.append(float(scores[r]))
                if len(kept_ids) == want:
                    break
        if len(kept_ids) >= want or take >= n:
            break
        take = min(n, take * 2 + (want - len(kept_ids)))

    if full and index.size != coll.estimated_document_count():
        info["index_size"] = index.size
    return kept_ids, kept_scores, info


def _top(scores, count):
    """Positions of the ``count`` highest scores, best first (ties by
    position)."""
    import numpy as np

    n = scores.shape[0]
    if count <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    if count < n:
        part = np.argpartition(-scores, count - 1)[:count]
    else:
        part = np.arange(n)
    return part[np.lexsort((part, -scores[part]))]


def _rank_external(index, base, vector, limit, min_similarity, with_scores, info):
    import numpy as np

    results = index.results
    with results.use_view(base):
        sample_ids, _ = results._kneighbors(query=vector[None, :], k=limit)
    sample_ids = [str(i) for i in (sample_ids[0] if sample_ids and isinstance(sample_ids[0], list) else sample_ids)]
    vectors, missing = index.vectors_of(sample_ids)
    present = [i for i in sample_ids if i not in set(missing)]
    scores = vectors @ vector if len(present) else np.zeros(0, np.float32)
    order = np.argsort(-scores, kind="stable")
    ids = [present[j] for j in order]
    scores = [float(scores[j]) for j in order]
    if min_similarity is not None:
        keep = [j for j, s in enumerate(scores) if s >= min_similarity]
        ids = [ids[j] for j in keep]
        scores = [scores[j] for j in keep]
    info["candidates"] = int(index.size)
    if with_scores:
        info["all_scores"] = np.asarray(scores, dtype=np.float32)
    return ids, scores, info


def ensure_score_field(dataset):
    """Declares the float ``similarity`` field that result views compute
    (needed once per dataset; no sample is written)."""
    import fiftyone.core.fields as fof

    schema = dataset.get_field_schema()
    field = schema.get(SCORE_FIELD)
    if field is None:
        dataset.add_sample_field(
            SCORE_FIELD, fof.FloatField,
            description="Similarity to the last smart search (computed by "
                        "the search's view; not stored)",
        )
    elif not isinstance(field, fof.FloatField):
        raise BulkLabelingError(
            "Field '%s' exists and is not a float field; smart search needs "
            "it to show scores" % SCORE_FIELD
        )


def result_view(base, ids, scores):
    """``base`` restricted to ``ids`` in that order, with each sample's score
    in the computed ``similarity`` field."""
    ensure_score_field(base._root_dataset)
    expr = {
        "$arrayElemAt": [
            {"$literal": [round(s, 6) for s in scores]},
            {"$indexOfArray": [{"$literal": list(ids)}, {"$toString": "$_id"}]},
        ]
    }
    return base.select(list(ids), ordered=True).set_field(SCORE_FIELD, expr)


def search(sample_collection, ids=None, text=None, image=None, k=DEFAULT_K,
           min_similarity=None, brain_key=None, with_scores=False):
    """Runs a smart search; see :func:`find_similar`.

    Returns:
        a dict: ``view`` (the ranked result view), ``ids`` and ``scores`` in
        rank order, ``brain_key``, ``query`` (``"samples"``, ``"text"`` or
        ``"image"``), ``candidates``, ``stale`` (a message, or None) and,
        with ``with_scores``, ``all_scores`` (every candidate's score)
    """
    k, min_similarity = _check_k(k, min_similarity)
    dataset = _root_dataset(sample_collection)
    base = _strip_search(sample_collection)
    brain_key = resolve_brain_key(dataset, brain_key)
    index = get_query_index(dataset, brain_key)
    if index.size == 0:
        raise BulkLabelingError(
            "Similarity index '%s' is empty. %s" % (
                brain_key, _stale_message(brain_key, dataset.count())))
    vector, kind = _query_vector(dataset, index, ids, text, image)
    kept_ids, kept_scores, info = rank(
        index, base, vector, k=k, min_similarity=min_similarity,
        with_scores=with_scores,
    )

    stale = None
    if info.get("not_indexed"):
        stale = _stale_message(brain_key, info["not_indexed"])
    elif "index_size" in info:
        count = dataset.count()
        if count != index.size:
            stale = _stale_message(
                brain_key, max(0, count - index.size),
                max(0, index.size - count),
            )

    out = {
        "view": result_view(base, kept_ids, kept_scores),
        "ids": kept_ids,
        "scores": kept_scores,
        "brain_key": brain_key,
        "query": kind,
        "k": k,
        "min_similarity": min_similarity,
        "candidates": info["candidates"],
        "stale": stale,
    }
    if with_scores:
        out["all_scores"] = info.get("all_scores")
    return out


def find_similar(dataset_or_view, ids=None, text=None, image=None,
                 k=DEFAULT_K, min_similarity=None, brain_key=None):
    """Ranks samples by similarity to samples, an image or a text prompt.

    The candidates are the samples of ``dataset_or_view`` (a previous
    search's result view counts as the view it was made from).

    Example::

        view = bl.find_similar(dataset, text="a red star", k=20)
        view = bl.find_similar(dataset, ids=[cat1, cat2], min_similarity=0.8)
        bl.label(view, add="cat")  # labels exactly the results

    Args:
        dataset_or_view: the samples to search
        ids (None): one or more query sample ids (their mean embedding)
        text (None): a text prompt
        image (None): a query image: a path, a PIL image, bytes, or
            ``{"name", "content"}`` with base64 content
        k (50): the number of results; None keeps every sample above
            ``min_similarity`` (up to 10,000)
        min_similarity (None): the lowest cosine similarity kept
        brain_key (None): the index; default: the dataset's index

    Returns:
        a :class:`fiftyone.core.view.DatasetView` of the results, most
        similar first, whose ``similarity`` field holds each score
        (higher = more similar)
    """
    result = search(dataset_or_view, ids=ids, text=text, image=image, k=k,
                    min_similarity=min_similarity, brain_key=brain_key)
    if result["stale"]:
        logger.warning(result["stale"])
    return result["view"]
