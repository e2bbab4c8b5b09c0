"""Sharded similarity-index builds: N delegated operations, one index.

:func:`bulk_labeling.core.similarity.iter_build_index` with ``num_shards > 1``
runs :func:`iter_build_sharded`, which validates like a plain build, takes a
snapshot of the samples to embed, splits it into ``num_shards`` contiguous,
disjoint parts and records the build in ``bulk_labeling.shard_builds``. Each
part is embedded by :func:`iter_run_shard`: a ``build_similarity_index_shard``
delegated operation that any ``fiftyone delegated launch`` worker picks up
(or, without delegation, inline, one after another). A shard stages its
vectors in ``bulk_labeling.shard_staging``; the shard that finishes last,
decided atomically by a ``$inc`` of the build's ``done`` counter, adds every
staged vector to the fiftyone-brain index in plan order, saves the index and
drops the staging. The index thus equals a single-worker build's, and keeps
the zoo-model config that text prompts need.

Build states: ``running``, then ``completed``, ``failed`` (a shard or the
assembly raised; the error is stored and the staging dropped) or
``abandoned`` (a new build of the same index found this one dead).
"""

import datetime
import itertools

import pymongo
from bson import Binary, ObjectId
from pymongo.errors import DuplicateKeyError

from . import database as db
from . import models
from . import similarity as sim
from .errors import BulkLabelingError
from .progress import Progress

BUILDS_COLLECTION = "bulk_labeling.shard_builds"
STAGING_COLLECTION = "bulk_labeling.shard_staging"

#: Sample ids per staged part of a shard's snapshot (~1 MB per document)
TODO_CHUNK = 50_000
#: Vectors a shard stages at once (each time, it also marks the build alive)
STAGE_CHUNK = 2048
#: Bytes of float32 vectors per staged document (MongoDB's limit is 16 MB)
STAGE_BYTES = 4 * 1024 * 1024
#: Vectors passed to the index at once while assembling (sklearn copies its
#: whole matrix on every add)
ASSEMBLE_CHUNK = 65_536
#: A shard's result lists at most this many ``sample_ids``: it is stored in
#: the delegated operation's record, which must stay below 16 MB
RESULT_MAX_IDS = 100_000
#: A running build untouched for this long, with no live delegated
#: operation, is dead: a new build of the same index may replace it
STALE_SECONDS = 600

_ACTIVE_RUN_STATES = ["queued", "scheduled", "running"]
_indexes_ready = set()


class _Stopped(BulkLabelingError):
    """This shard must stop, but the build is not its to fail (it failed or
    was replaced already, or a rerun of the shard took over)."""


def _collections():
    conn = db.get_db()
    builds = conn[BUILDS_COLLECTION]
    staging = conn[STAGING_COLLECTION]
    key = id(conn.client)
    if key not in _indexes_ready:
        # The lock: one running build per index
        builds.create_index(
            [("dataset_id", pymongo.ASCENDING), ("brain_key", pymongo.ASCENDING)],
            unique=True, name="one_running_build",
            partialFilterExpression={"state": "running"},
        )
        staging.create_index(
            [("build_id", pymongo.ASCENDING), ("kind", pymongo.ASCENDING),
             ("shard", pymongo.ASCENDING), ("seq", pymongo.ASCENDING)]
        )
        _indexes_ready.add(key)
    return builds, staging


def _now():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _split(ids, num_shards):
    """``ids`` cut into at most ``num_shards`` contiguous parts of near-equal
    size (at least one part, possibly empty)."""
    num_shards = max(1, min(num_shards, len(ids)))
    size, extra = divmod(len(ids), num_shards)
    parts, start = [], 0
    for i in range(num_shards):
        end = start + size + (1 if i < extra else 0)
        parts.append(ids[start:end])
        start = end
    return parts


# ----------------------------------------------------------------- parent


def iter_build_sharded(dataset, args, batch_size=None, num_workers=None,
                       device=None, launch=None):
    """Plans a sharded build and launches its shards. A generator of
    :class:`Progress`.

    Args:
        dataset: the dataset
        args: the validated request (``similarity._BuildArgs``)
        batch_size (None): images per batch, for every shard
        num_workers (None): image-decoding processes, for every shard
        device (None): the device every shard uses (checked by each)
        launch (None): ``launch(build_id, num_shards, label)`` queues the
            shards as delegated operations and returns their ids; None runs
            them here, one after another

    Returns:
        with ``launch``: ``brain_key``, ``build_id``, ``num_shards``,
        ``shard_operations``, ``samples`` (to embed), ``model`` and
        ``model_kwargs``; without it, the assembled index's build summary
        plus ``build_id``, ``num_shards`` and ``shard_operations`` (empty)
    """
    results = None
    if args.existing is not None and not args.overwrite:
        results = sim._load_results(dataset, args.brain_key)
    todo, _ = sim._plan(dataset, results)
    parts = _split([ObjectId(i) for i, _ in todo], args.num_shards)
    yield Progress(0, len(parts), "Planning %d shard(s)" % len(parts))

    builds, staging = _collections()
    now = _now()
    build = {
        "_id": ObjectId(),
        "dataset_id": dataset._doc.id,
        "dataset_name": dataset.name,
        "brain_key": args.brain_key,
        "backend": args.backend,
        "model": args.spec.to_dict(),
        "zoo_kwargs": args.zoo_kwargs,
        "overwrite": args.overwrite,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "device": device,
        "precision": args.precision,
        "num_shards": len(parts),
        "shards": [{"state": "queued", "size": len(p)} for p in parts],
        "done": 0,
        "state": "running",
        "operations": [],
        "created_at": now,
        "updated_at": now,
    }
    _insert_build(builds, build)
    build_id = build["_id"]
    try:
        for shard, part in enumerate(parts):
            for seq, start in enumerate(range(0, len(part), TODO_CHUNK)):
                staging.insert_one({
                    "build_id": build_id, "kind": "todo", "shard": shard,
                    "seq": seq, "ids": part[start:start + TODO_CHUNK],
                })
        if launch is not None:
            label = "Build similarity index '%s'" % args.brain_key
            operations = [str(i) for i in launch(str(build_id), len(parts), label)]
            builds.update_one({"_id": build_id},
                              {"$set": {"operations": operations,
                                        "updated_at": _now()}})
    except BaseException as e:
        _finish(build_id, "failed", error=_describe(e))
        raise

    if launch is not None:
        yield Progress(len(parts), len(parts), "Queued %d shard(s)" % len(parts))
        return {
            "brain_key": args.brain_key,
            "build_id": str(build_id),
            "num_shards": len(parts),
            "shard_operations": operations,
            "samples": len(todo),
            "model": args.spec.to_dict(),
            "model_kwargs": args.zoo_kwargs,
        }

    summary = None
    for shard in range(len(parts)):
        result = yield from iter_run_shard(dataset, build_id, shard)
        summary = result.get("index") or summary
    summary.update(build_id=str(build_id), num_shards=len(parts),
                   shard_operations=[], model=args.spec.to_dict(),
                   model_kwargs=args.zoo_kwargs, created=results is None)
    return summary


def _insert_build(builds, build):
    """Inserts a running build, unless a live one of the same index runs (a
    dead one is marked ``abandoned`` first)."""
    for _ in range(3):
        try:
            builds.insert_one(build)
            return
        except DuplicateKeyError:
            pass
        other = builds.find_one({"dataset_id": build["dataset_id"],
                                 "brain_key": build["brain_key"],
                                 "state": "running"})
        if other is None:
            continue
        live = _live_operations(other)
        if live or other["updated_at"] > _now() - datetime.timedelta(
                seconds=STALE_SECONDS):
            raise BulkLabelingError(
                "A sharded build of similarity index '%s' is already running "
                "(build %s%s). Wait for it to finish; if its workers died, "
                "mark its operations failed (`fiftyone delegated fail <id>`) "
                "and build again"
                % (build["brain_key"], other["_id"],
                   "; delegated operations: %s" % ", ".join(live) if live else "")
            )
        _finish(other["_id"], "abandoned",
                error="replaced by build %s" % build["_id"])
    raise BulkLabelingError(
        "Could not start a sharded build of '%s': other builds keep starting"
        % build["brain_key"])


def _live_operations(build):
    """The ids of a build's delegated operations that are still queued or
    running."""
    ids = list(build.get("operations") or [])
    ids += [s["operation"] for s in build["shards"] if s.get("operation")]
    ids = [ObjectId(i) for i in ids if ObjectId.is_valid(str(i))]
    if not ids:
        return []
    docs = db.get_db()["delegated_ops"].find(
        {"_id": {"$in": ids}, "run_state": {"$in": _ACTIVE_RUN_STATES}},
        {"_id": 1},
    )
    return [str(d["_id"]) for d in docs]


def _finish(build_id, state, error=None, summary=None):
    """Ends a running build and drops its staging."""
    builds, staging = _collections()
    update = {"state": state, "updated_at": _now(), "finished_at": _now()}
    if error is not None:
        update["error"] = error
    if summary is not None:
        update["summary"] = summary
    builds.update_one({"_id": build_id, "state": "running"}, {"$set": update})
    staging.delete_many({"build_id": build_id})


def _describe(e):
    return str(e) or type(e).__name__


# ------------------------------------------------------------------ shard


def iter_run_shard(dataset, build_id, shard, operation_id=None):
    """Embeds one shard of a sharded build and stages its vectors; the
    shard that finishes last assembles the index. A generator of
    :class:`Progress`.

    Running a shard again (e.g. ``fiftyone delegated rerun`` after its
    worker died) redoes it; the latest run wins.

    Args:
        dataset: the dataset of the build
        build_id: the build's id
        shard: the shard's number (from 0)
        operation_id (None): the delegated operation running this shard

    Returns:
        a dict: ``build_id``, ``shard``, ``num_shards``, ``brain_key``,
        ``sample_ids`` (the ids it embedded; the first
        :data:`RESULT_MAX_IDS`, with ``sample_ids_truncated``), ``added``,
        ``failed``, ``failed_ids``, ``assembled`` (whether this shard built
        the index) and, if it did, ``index`` (the build summary)
    """
    dataset = sim._root_dataset(dataset)
    build_id, shard = _check_shard_args(build_id, shard)
    builds, staging = _collections()
    attempt = ObjectId()
    key = "shards.%d." % shard
    build = builds.find_one_and_update(
        {"_id": build_id, "dataset_id": dataset._doc.id, "state": "running",
         key + "state": {"$in": ["queued", "running"]}},
        {"$set": {key + "state": "running", key + "attempt": attempt,
                  key + "operation": operation_id, "updated_at": _now()}},
        return_document=pymongo.ReturnDocument.AFTER,
    )
    if build is None:
        raise BulkLabelingError(_why_not_running(dataset, build_id, shard))

    mine = {"_id": build_id, "state": "running", key + "attempt": attempt}
    try:
        # What an earlier run of this shard staged
        staging.delete_many({"build_id": build_id, "kind": "vectors",
                             "shard": shard})
        todo = _snapshot(dataset, staging, build_id, shard)
        spec = models.resolve(**build["model"])
        yield Progress(0, len(todo), "Loading model %s" % spec.describe())
        embedder = sim.load_embedder(spec, sim._check_device(build["device"]),
                                     precision=build.get("precision", "auto"))
        seqs = itertools.count()
        embedded = []

        def stage(ids, vectors):
            _beat(builds, mine, dataset, build_id, shard)
            rows = max(1, STAGE_BYTES // (4 * vectors.shape[1]))
            for start in range(0, len(ids), rows):
                part = vectors[start:start + rows].astype("float32")
                staging.insert_one({
                    "build_id": build_id, "kind": "vectors", "shard": shard,
                    "attempt": attempt, "seq": next(seqs),
                    "ids": ids[start:start + rows], "dim": part.shape[1],
                    "vectors": Binary(part.tobytes()),
                })
            embedded.extend(ids)

        failed = yield from sim.iter_embed(
            embedder, todo, build["batch_size"], build["num_workers"], stage,
            STAGE_CHUNK)
    except _Stopped:
        staging.delete_many({"build_id": build_id, "attempt": attempt})
        raise
    except BaseException as e:
        _finish(build_id, "failed", error="shard %d: %s" % (shard, _describe(e)))
        raise

    build = builds.find_one_and_update(
        dict(mine, **{key + "state": "running"}),
        {"$set": {key + "state": "done", key + "added": len(embedded),
                  key + "failed": len(failed), key + "failed_ids": failed[:20],
                  "updated_at": _now()},
         "$inc": {"done": 1}},
        return_document=pymongo.ReturnDocument.AFTER,
    )
    if build is None:
        staging.delete_many({"build_id": build_id, "attempt": attempt})
        raise _Stopped(_why_not_running(dataset, build_id, shard))

    result = {
        "build_id": str(build_id),
        "shard": shard,
        "num_shards": build["num_shards"],
        "brain_key": build["brain_key"],
        "sample_ids": embedded[:RESULT_MAX_IDS],
        "added": len(embedded),
        "failed": len(failed),
        "failed_ids": failed[:20],
        "assembled": False,
    }
    if len(embedded) > RESULT_MAX_IDS:
        result["sample_ids_truncated"] = True
    # Exactly one shard sees the counter reach num_shards
    if build["done"] == build["num_shards"]:
        try:
            summary = yield from _iter_assemble(dataset, build, embedder)
        except BaseException as e:
            _finish(build_id, "failed", error="assembly: %s" % _describe(e))
            raise
        _finish(build_id, "completed", summary=summary)
        result.update(assembled=True, index=summary)
    return result


def _check_shard_args(build_id, shard):
    if not ObjectId.is_valid(str(build_id)):
        raise BulkLabelingError("build_id '%s' is not a valid id" % build_id)
    if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
        raise BulkLabelingError("shard must be an integer >= 0")
    return ObjectId(str(build_id)), shard


def _why_not_running(dataset, build_id, shard):
    builds, _ = _collections()
    build = builds.find_one({"_id": build_id})
    if build is None or build["dataset_id"] != dataset._doc.id:
        return "Dataset '%s' has no sharded build %s" % (dataset.name, build_id)
    if shard >= build["num_shards"]:
        return "Sharded build %s has %d shard(s); there is no shard %d" % (
            build_id, build["num_shards"], shard)
    if build["state"] != "running":
        return "Sharded build %s of '%s' is %s%s" % (
            build_id, build["brain_key"], build["state"],
            ": %s" % build["error"] if build.get("error") else "")
    state = build["shards"][shard]["state"]
    if state == "done":
        return "Shard %d of build %s is done already" % (shard, build_id)
    return "Shard %d of build %s was started again elsewhere" % (shard, build_id)


def _beat(builds, mine, dataset, build_id, shard):
    """Marks the build alive; stops this shard if the build is no longer
    running or another run of the shard took over."""
    if not builds.update_one(mine, {"$set": {"updated_at": _now()}}).matched_count:
        raise _Stopped(_why_not_running(dataset, build_id, shard))


def _snapshot(dataset, staging, build_id, shard):
    """The ``(id, filepath)`` of the shard's samples, in plan order; samples
    deleted since the plan are skipped."""
    ids = []
    for doc in staging.find({"build_id": build_id, "kind": "todo",
                             "shard": shard}).sort("seq", pymongo.ASCENDING):
        ids.extend(doc["ids"])
    coll = db.sample_coll(dataset)
    todo = []
    for start in range(0, len(ids), db.ID_BATCH_SIZE):
        batch = ids[start:start + db.ID_BATCH_SIZE]
        paths = {d["_id"]: d["filepath"] for d in coll.find(
            {"_id": {"$in": batch}}, {"filepath": 1})}
        todo.extend((str(i), paths[i]) for i in batch if i in paths)
    return todo


# --------------------------------------------------------------- assembly


def _iter_assemble(dataset, build, embedder):
    """Adds every shard's staged vectors to the index, in plan order, drops
    deleted samples from it and saves it. A generator of :class:`Progress`.

    Returns:
        the build summary (see :func:`similarity.build_summary`)
    """
    brain_key = build["brain_key"]
    total = sum(s["added"] for s in build["shards"])
    failed = sum(s["failed"] for s in build["shards"])
    failed_ids = [i for s in build["shards"] for i in s["failed_ids"]]
    yield Progress(0, total, "Assembling index")
    dataset.reload()  # shards may run in processes that loaded it earlier
    current = set(dataset.values("id"))
    overwrite = build["overwrite"]
    for _ in range(3):
        doc = sim._run_doc(dataset, brain_key)
        if doc is not None and overwrite:
            dataset.delete_brain_run(brain_key)
            sim._invalidate(dataset, brain_key)
            doc, overwrite = None, False
        if doc is None:
            results, token = sim._create_index(
                dataset, brain_key, build["backend"], embedder,
                build["zoo_kwargs"]), None
        else:
            _check_same_index(doc, build)
            results, token = sim._load_results(dataset, brain_key), doc.get("results")

        index_ids = sim._index_ids(results) or []
        gone = [i for i in index_ids if i not in current]
        if gone:
            results.remove_from_index(sample_ids=gone, reload=False)
        added = yield from _iter_add_staged(build, results, current,
                                            set(index_ids), total)
        if token is None:
            results.save()
            sim._invalidate(dataset, brain_key)
            break
        if sim._save(dataset, brain_key, results, token):
            break
        # Another process saved the index meanwhile: redo on the new one
    else:
        raise BulkLabelingError(
            "Similarity index '%s' kept changing while the shards were "
            "assembled; build again" % brain_key)

    seconds = (_now() - build["created_at"]).total_seconds()
    return sim.build_summary(brain_key, results, added, len(gone), failed,
                             failed_ids, seconds)


def _check_same_index(doc, build):
    cfg = doc["config"]
    if (cfg.get("type") != "similarity" or
            sim._zoo_kwargs(doc) != build["zoo_kwargs"] or
            cfg.get("method") != build["backend"]):
        raise BulkLabelingError(
            "Brain key '%s' was taken by another run while the shards were "
            "embedded; build again (with overwrite=True to replace it)"
            % build["brain_key"])


def _iter_add_staged(build, results, current, skip, total):
    """Adds the staged vectors of every shard's latest run, except those of
    samples deleted meanwhile (not in ``current``) or already in the index
    (``skip``). Returns how many were added."""
    import numpy as np

    _, staging = _collections()
    backend = build["backend"]
    runs = [{"shard": i, "attempt": s["attempt"]}
            for i, s in enumerate(build["shards"])]
    cursor = staging.find(
        {"build_id": build["_id"], "kind": "vectors", "$or": runs}
    ).sort([("shard", pymongo.ASCENDING), ("seq", pymongo.ASCENDING)])
    pending_ids, pending_vecs = [], []
    added = seen = 0

    def flush():
        if pending_ids:
            results.add_to_index(sim._to_store(np.concatenate(pending_vecs), backend),
                                 sim._ids_for(pending_ids, backend), reload=False)
            pending_ids.clear()
            pending_vecs.clear()

    for doc in cursor:
        ids = doc["ids"]
        vectors = np.frombuffer(doc["vectors"], dtype=np.float32).reshape(
            len(ids), doc["dim"])
        keep = [j for j, i in enumerate(ids) if i in current and i not in skip]
        pending_ids.extend(ids[j] for j in keep)
        pending_vecs.append(vectors[keep])
        added += len(keep)
        seen += len(ids)
        if len(pending_ids) >= ASSEMBLE_CHUNK:
            flush()
        yield Progress(seen, total, "Assembling index")
    flush()
    return added
