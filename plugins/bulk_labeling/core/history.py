"""The operation journal: an audit log, exact undo and crash safety for every
bulk operation.

Every bulk operation is an :class:`Operation`. Its record lives in a
collection of its own (never inside the sample documents) and moves through
these statuses::

    pending -> applied            (the normal case)
    pending -> failed             (an error before any sample was written)
    applied/pending -> undone     (see :func:`undo`)

A process that dies mid-way leaves its record ``pending``: never an undetected
half-applied state. :func:`pending_operations` surfaces such records, and
:func:`resume` or :func:`undo` brings the dataset to all-or-nothing.

An operation runs in two phases, so that it can be resumed or undone from any
point:

1.  **targeting**: the ids of the targeted samples are stored in chunks of at
    most :data:`bulk_labeling.core.database.ID_BATCH_SIZE` (see
    :func:`bulk_labeling.core.database.batch_size_for`);
2.  **writing**: each chunk is captured (the prior state that the write will
    destroy is copied into the undo collection, then the capture is marked
    complete) and then written, and the chunk is marked done. Chunks are
    written by :func:`bulk_labeling.core.database.write_workers` threads at
    once, each chunk on its own, so a kill leaves each chunk either done,
    captured-but-maybe-half-written, or untouched.

How to invert an operation is described by a list of *inverse steps* of a few
generic kinds, so that undo does not depend on the module that wrote:

-   ``pull_labels``: labels created by the operation, whose ids are derived
    from the operation's id prefixes (see
    :func:`bulk_labeling.core.database.allocate_id_prefixes`), are removed;
-   ``restore_labels``: labels of the concepts ``names`` captured before
    they were removed or renamed are put back with the same ids;
-   ``restore_values``: values of a field (or of top-level keys of a field)
    captured with the value the operation wrote are restored where the sample
    still holds what the operation wrote;
-   ``delete_samples``: samples the operation added are deleted.

Undo never clobbers a later change: a sample changed again since the
operation is reported as a conflict and left alone.
"""

import datetime
import logging
import numbers

import pymongo
from bson import ObjectId
from bson.raw_bson import DEFAULT_RAW_BSON_OPTIONS

from . import database as db
from .errors import BulkLabelingError
from .idbatch import IdBatch, split_document
from .progress import Progress

logger = logging.getLogger(__name__)

PENDING = "pending"
APPLIED = "applied"
FAILED = "failed"
UNDONE = "undone"

#: Samples per capture document in the undo collection
CAPTURE_CHUNK_SIZE = 1000

#: At most this many target ids are kept in memory between the targeting and
#: writing phases of an operation (about 100 MB); larger targets are read
#: back from the journal batch by batch
TARGET_CACHE_SIZE = 1000000

#: Operation types registered by the core modules, mapped to the function
#: that (re)runs their writing phase. Filled by :func:`register_writer`
_WRITERS = {}

_indexes_ready = set()


def register_writer(op_type, writer):
    """Registers the function that runs the writing phase of an operation
    type, so that :func:`resume` can finish an interrupted run.

    ``writer(dataset, operation)`` must be a generator of
    :class:`bulk_labeling.core.progress.Progress` that processes
    ``operation.iter_pending_batches()`` and returns nothing.
    """
    _WRITERS[op_type] = writer


def _collections():
    conn = db.get_db()
    ops = conn[db.OPERATIONS_COLLECTION]
    targets = conn[db.TARGETS_COLLECTION]
    undo = conn[db.UNDO_COLLECTION]
    key = id(conn.client)
    if key not in _indexes_ready:
        ops.create_index(
            [("dataset_id", pymongo.ASCENDING), ("started_at", pymongo.DESCENDING)]
        )
        targets.create_index(
            [("op_id", pymongo.ASCENDING), ("seq", pymongo.ASCENDING)]
        )
        # Captures are found by chunk, so no multikey index on the sample
        # ids is needed (it cost ~15% of a capture)
        undo.create_index(
            [
                ("op_id", pymongo.ASCENDING),
                ("step", pymongo.ASCENDING),
                ("seq", pymongo.ASCENDING),
            ]
        )
        _indexes_ready.add(key)

    return ops, targets, undo


def _now():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class Operation(object):
    """A journaled bulk operation.

    Args:
        dataset: the :class:`fiftyone.core.dataset.Dataset`
        record: the operation's record, as stored
    """

    def __init__(self, dataset, record, fresh=False):
        self.dataset = dataset
        self.record = record
        self._cached_targets = None
        # A fresh operation has no captures yet: no need to look for them
        self._fresh = fresh

    @property
    def id(self):
        return self.record["_id"]

    @property
    def operation_id(self):
        return str(self.record["_id"])

    @property
    def type(self):
        return self.record["type"]

    @property
    def params(self):
        return self.record["params"]

    @property
    def inverse(self):
        return self.record["inverse"]

    @classmethod
    def begin(cls, dataset, op_type, params, inverse, target=None, user=None):
        """Creates the ``pending`` record of a new operation.

        Args:
            dataset: the dataset
            op_type: the operation type, e.g. ``"label_as"``
            params: a JSON-able dict of the operation's parameters
            inverse: the list of inverse steps (see module docs)
            target (None): a JSON-able description of how the target was
                chosen
            user (None): the user, when FiftyOne knows one
        """
        ops, _, _ = _collections()
        record = {
            "_id": ObjectId(),
            "dataset_id": dataset._doc.id,
            "dataset_name": dataset.name,
            "type": op_type,
            "params": params,
            "target": dict(target or {}, count=0),
            "user": user,
            "started_at": _now(),
            "ended_at": None,
            "status": PENDING,
            "stage": "targeting",
            "num_batches": 0,
            "batches_done": 0,
            "done_seqs": [],
            "captured": [],
            "matched": 0,
            "changed": 0,
            "inverse": inverse,
        }
        ops.insert_one(record)
        return cls(dataset, record, fresh=True)

    @classmethod
    def load(cls, dataset, operation_id):
        ops, _, _ = _collections()
        try:
            _id = ObjectId(str(operation_id))
        except Exception:
            raise BulkLabelingError(
                "'%s' is not a valid operation id" % operation_id
            )

        record = ops.find_one({"_id": _id, "dataset_id": dataset._doc.id})
        if record is None:
            raise BulkLabelingError(
                "Dataset '%s' has no bulk operation '%s'"
                % (dataset.name, operation_id)
            )

        return cls(dataset, record)

    def _update(self, **fields):
        ops, _, _ = _collections()
        ops.update_one({"_id": self.id}, {"$set": fields})
        self.record.update(fields)

    def store_target_ids(self, id_batches):
        """Stores the targeted sample ids (targeting phase).

        Args:
            id_batches: an iterable of
                :class:`bulk_labeling.core.idbatch.IdBatch` (or lists of
                sample ``ObjectId``)

        Returns:
            the number of targeted samples
        """
        _, targets, _ = _collections()
        count = 0
        seq = 0
        # The writing phase that follows in this process reuses the ids
        # instead of reading them back, up to a bounded number of them
        cached = []
        for ids in id_batches:
            ids = IdBatch.of(ids)
            targets.insert_one(ids.document({"op_id": self.id, "seq": seq}))
            if cached is not None and count + len(ids) <= TARGET_CACHE_SIZE:
                cached.append((seq, ids))
            else:
                cached = None
            seq += 1
            count += len(ids)

        self._cached_targets = cached

        target = dict(self.record["target"], count=count)
        self._update(target=target, num_batches=seq, stage="writing")
        return count

    def iter_target_batches(self):
        """Yields ``(seq, ids)`` for every stored chunk of target ids, the
        ids as an :class:`bulk_labeling.core.idbatch.IdBatch`."""
        _, targets, _ = _collections()
        raw = targets.with_options(codec_options=DEFAULT_RAW_BSON_OPTIONS)
        cursor = raw.find(
            {"op_id": self.id},
            {"_id": 0, "ids": 1, "seq": 1, "count": 1},
        ).sort("seq", 1)
        for chunk in cursor:
            fields, ids = split_document(chunk)
            yield fields["seq"], ids

    def iter_pending_batches(self):
        """Yields ``(seq, ids)`` for the chunks not yet written."""
        done = set(self.record.get("done_seqs") or [])
        cached = self._cached_targets
        if cached is not None:
            batches = iter(cached)
        else:
            batches = self.iter_target_batches()
        return ((seq, ids) for seq, ids in batches if seq not in done)

    def batch_done(self, seq, matched, changed):
        """Marks a chunk written and adds its counts, in one atomic update."""
        ops, _, _ = _collections()
        ops.update_one(
            {"_id": self.id},
            {
                "$addToSet": {"done_seqs": seq},
                "$inc": {"batches_done": 1, "matched": matched,
                         "changed": changed},
            },
        )
        self.record.setdefault("done_seqs", []).append(seq)
        self.record["batches_done"] += 1
        self.record["matched"] += matched
        self.record["changed"] += changed

    def run_batches(self, process, label):
        """Writes the pending chunks, several at once (see
        :func:`bulk_labeling.core.database.map_batches`).

        ``process(seq, ids)`` captures and writes one chunk and returns
        ``(matched, changed)``. Each chunk is marked done as it finishes. A
        generator of :class:`Progress`.
        """
        total = self.record["target"]["count"]
        done = self.record["matched"]
        for (seq, ids), (matched, changed) in db.map_batches(
            self.iter_pending_batches(), process
        ):
            self.batch_done(seq, matched, changed)
            done += len(ids)
            yield Progress(min(done, total), total, label)

    def capture(self, ids, pipeline, step, seq):
        """Copies prior state into the undo collection, server-side.

        Captures are grouped into chunks of about :data:`CAPTURE_CHUNK_SIZE`
        samples, so a million-sample operation writes a thousand small
        documents rather than a million, and none nears MongoDB's 16 MB limit.
        Once complete, the capture is marked in the operation's record; the
        chunk is written only after that.

        Args:
            ids: the :class:`bulk_labeling.core.idbatch.IdBatch` of the chunk
            pipeline: an aggregation pipeline over the sample collection that
                starts with a ``$match`` of ``ids.query(...)`` and outputs
                one document per sample: its ``_id`` and the captured data
            step: the index of the inverse step the capture belongs to
            seq: the chunk of targets the captured samples belong to
        """
        marker = _capture_marker(seq, step)
        ops, _, undo = _collections()
        if not self._fresh:
            # Resuming: a complete capture holds the state before the
            # interrupted write, which must not be captured again. An
            # incomplete one was never followed by a write: redo it
            if marker in (self.record.get("captured") or []):
                return
            undo.delete_many({"op_id": self.id, "step": step, "seq": seq})

        tail = [
            {
                "$bucketAuto": {
                    "groupBy": "$_id",
                    "buckets": max(1, -(-len(ids) // CAPTURE_CHUNK_SIZE)),
                    "output": {"entries": {"$push": "$$ROOT"}},
                }
            },
            {
                "$project": {
                    "_id": 0,
                    "op_id": self.id,
                    "step": {"$literal": step},
                    "seq": {"$literal": seq},
                    "entries": 1,
                }
            },
            {"$merge": {"into": db.UNDO_COLLECTION, "whenMatched": "fail"}},
        ]
        coll = db.sample_coll(self.dataset)
        hint = db.scan_hint(coll, ids)
        # aggregate() takes a hint as a document, not as (key, order) pairs
        list(coll.aggregate(pipeline + tail, allowDiskUse=True,
                            **({"hint": dict(hint)} if hint else {})))
        ops.update_one({"_id": self.id}, {"$addToSet": {"captured": marker}})

    def capture_labels(self, ids, field, names, step, seq):
        """Captures, for a ``restore_labels`` step, the label list of a
        Classifications field on the samples ``ids`` that hold a label named
        in ``names``.

        The whole list is copied, and undo keeps the labels of ``names``
        (the step's ``names``): a plain inclusion projection costs 25% less
        than filtering each list here, and no computed field (measured).
        """
        path = "%s.classifications" % field
        self.capture(
            ids,
            [
                {"$match": ids.query({path + ".label": {"$in": names}})},
                {"$project": {path: 1}},
            ],
            step,
            seq,
        )

    def finish(self, **extra):
        """Marks the operation applied."""
        self._update(status=APPLIED, stage="done", ended_at=_now(), **extra)

    def fail(self, error):
        """Marks an operation that wrote nothing as failed."""
        self._update(status=FAILED, ended_at=_now(), error=str(error))

    def summary(self):
        """Returns the JSON-able summary used by ``bulk_history``."""
        r = self.record
        return {
            "operation_id": str(r["_id"]),
            "type": r["type"],
            "status": r["status"],
            "params": r["params"],
            "target": r["target"],
            "user": r.get("user"),
            "matched": r["matched"],
            "changed": r["changed"],
            "started_at": _iso(r["started_at"]),
            "ended_at": _iso(r.get("ended_at")),
            "undone_by": r.get("undone_by"),
            "conflicts": r.get("conflicts"),
            "error": r.get("error"),
        }


def _capture_marker(seq, step):
    return "%d:%d" % (seq, step)


def _iso(value):
    return value.isoformat() + "Z" if value is not None else None


def run_operation(dataset, op_type, params, inverse, id_batches, writer,
                  target=None, user=None):
    """Runs a journaled operation: begin, targeting, writing, finish.

    A generator of :class:`Progress` events that returns the finished
    :class:`Operation`.
    """
    op = Operation.begin(
        dataset, op_type, params, inverse, target=target, user=user
    )
    try:
        op.store_target_ids(id_batches)
    except Exception as e:
        op.fail(e)
        raise

    yield from writer(dataset, op)
    op.finish()
    db.reload_samples(dataset)
    return op


def list_operations(dataset, limit=50, types=None, statuses=None):
    """Returns summaries of the dataset's bulk operations, newest first.

    Args:
        dataset: the dataset
        limit (50): the maximum number of operations to return
        types (None): only operations of these types
        statuses (None): only operations with these statuses
    """
    ops, _, _ = _collections()
    query = {"dataset_id": dataset._doc.id}
    if types:
        query["type"] = {"$in": list(types)}
    if statuses:
        query["status"] = {"$in": list(statuses)}

    cursor = ops.find(query).sort("started_at", -1).limit(int(limit or 0))
    return [Operation(dataset, r).summary() for r in cursor]


def pending_operations(dataset):
    """Returns the summaries of operations left ``pending`` by a process
    that died, or that is still running."""
    return list_operations(dataset, limit=0, statuses=[PENDING])


def warn_pending(dataset):
    """Logs a warning for every interrupted operation of the dataset.

    Returns:
        the pending summaries
    """
    pending = pending_operations(dataset)
    for summary in pending:
        logger.warning(
            "Bulk operation %s (%s) on dataset '%s' did not finish: it may "
            "be half-applied. Run bulk_labeling.resume(dataset, '%s') or "
            "bulk_labeling.undo(dataset, '%s')",
            summary["operation_id"],
            summary["type"],
            dataset.name,
            summary["operation_id"],
            summary["operation_id"],
        )

    return pending


def latest_operation_id(dataset):
    """Returns the id of the latest operation that can be undone."""
    ops, _, _ = _collections()
    record = ops.find_one(
        {
            "dataset_id": dataset._doc.id,
            "status": {"$in": [APPLIED, PENDING]},
            "type": {"$ne": "undo"},
        },
        sort=[("started_at", -1)],
    )
    if record is None:
        raise BulkLabelingError(
            "Dataset '%s' has no bulk operation to undo" % dataset.name
        )

    return str(record["_id"])


def iter_resume(dataset, operation_id):
    """Finishes an interrupted (``pending``) operation. A generator of
    :class:`Progress` that returns the operation's summary."""
    op = Operation.load(dataset, operation_id)
    if op.record["status"] != PENDING:
        raise BulkLabelingError(
            "Operation %s is %s; only pending operations can be resumed"
            % (operation_id, op.record["status"])
        )

    if op.record["stage"] == "targeting":
        # Nothing was written to any sample
        op.fail("interrupted before any sample was written; run it again")
        return op.summary()

    writer = _WRITERS.get(op.type)
    if writer is None:
        raise BulkLabelingError(
            "Operations of type '%s' cannot be resumed" % op.type
        )

    yield from writer(dataset, op)
    op.finish(resumed=True)
    db.reload_samples(dataset)
    return op.summary()


def iter_undo(dataset, operation_id=None, dry_run=False, user=None):
    """Undoes an operation, restoring the exact prior state of the samples it
    changed, except where a sample was changed again since; those are
    reported as conflicts and left alone.

    A generator of :class:`Progress` that returns a dict with
    ``operation_id`` (the undo's own journal id), ``undone`` (the id of the
    undone operation), ``matched``, ``changed`` and ``conflicts``.
    """
    if operation_id is None:
        operation_id = latest_operation_id(dataset)

    op = Operation.load(dataset, operation_id)
    status = op.record["status"]
    if status not in (APPLIED, PENDING):
        raise BulkLabelingError(
            "Operation %s is %s and cannot be undone" % (operation_id, status)
        )

    if op.type == "undo":
        raise BulkLabelingError("An undo cannot itself be undone")

    total = op.record["target"]["count"]
    stats = {"matched": 0, "changed": 0, "conflicts": []}

    if dry_run:
        for seq, ids in op.iter_target_batches():
            stats["matched"] += len(ids)
        return dict(
            operation_id=None, undone=op.operation_id, dry_run=True, **stats
        )

    journal = Operation.begin(
        dataset,
        "undo",
        {"operation_id": op.operation_id},
        inverse=[],
        target={"kind": "operation", "operation_id": op.operation_id},
        user=user,
    )
    journal._update(stage="writing")

    def undo_batch(seq, ids):
        # The steps of one chunk run in order; chunks run in parallel
        batch_stats = {"conflicts": []}
        changed = set()
        for index, step in enumerate(op.inverse):
            undo_step = _UNDO_STEPS[step["kind"]]
            changed |= undo_step(dataset, op, index, step, seq, ids, batch_stats)
        return len(changed), batch_stats["conflicts"]

    if op.record["stage"] != "targeting":
        # Deleting samples goes through FiftyOne's own delete_samples(),
        # which is not meant to run in several threads at once
        kinds = {step["kind"] for step in op.inverse}
        workers = 1 if "delete_samples" in kinds else None
        done = 0
        for (seq, ids), (changed, conflicts) in db.map_batches(
            op.iter_target_batches(), undo_batch, workers=workers
        ):
            stats["matched"] += len(ids)
            stats["changed"] += changed
            stats["conflicts"] += conflicts
            done += len(ids)
            yield Progress(done, total, "Undoing %s" % op.type)

    conflicts = stats["conflicts"][:100]
    num_conflicts = len(stats["conflicts"])
    op._update(status=UNDONE, undone_by=journal.operation_id,
               conflicts=num_conflicts)
    journal._update(target={"kind": "operation", "count": stats["matched"],
                            "operation_id": op.operation_id})
    journal.finish(matched=stats["matched"], changed=stats["changed"],
                   conflicts=num_conflicts)
    journal.record.update(matched=stats["matched"], changed=stats["changed"])
    db.reload_samples(dataset)

    return {
        "operation_id": journal.operation_id,
        "undone": op.operation_id,
        "matched": stats["matched"],
        "changed": stats["changed"],
        "conflicts": conflicts,
        "num_conflicts": num_conflicts,
    }


def _iter_capture_chunks(op, step_index, seq):
    """Yields the lists of per-sample captures (about
    :data:`CAPTURE_CHUNK_SIZE` each) of a step for the target chunk ``seq``."""
    _, _, undo = _collections()
    for chunk in undo.find({"op_id": op.id, "step": step_index, "seq": seq}):
        yield chunk["entries"]


def _current_docs(coll, sample_ids, projection):
    """The current documents of samples, read in one query."""
    return {
        doc["_id"]: doc
        for doc in coll.find({"_id": {"$in": list(sample_ids)}}, projection)
    }


def _undo_pull_labels(dataset, op, index, step, seq, ids, stats):
    """Removes the labels the operation created, identified by their
    derived ids."""
    field = step["field"]
    created = [db.generated_id_expr(p) for p in step["prefixes"]]
    current = {"$ifNull": ["$%s.classifications" % field, []]}
    kept = {
        "$filter": {
            "input": current,
            "cond": {"$not": [{"$in": ["$$this._id", created]}]},
        }
    }
    has_created = {
        "$anyElementTrue": [
            {"$map": {"input": current, "in": {"$in": ["$$this._id", created]}}}
        ]
    }
    coll = db.sample_coll(dataset)
    changed = coll.distinct("_id", ids.query({"$expr": has_created}))
    if changed:
        coll.update_many(
            {"_id": {"$in": changed}},
            [
                {
                    "$set": {
                        field: db.classifications_expr(field, kept),
                        "last_modified_at": "$$NOW",
                    }
                }
            ],
        )

    return set(changed)


def _undo_restore_labels(dataset, op, index, step, seq, ids, stats):
    """Puts captured labels back, with their ids.

    A captured label still present with the value the operation wrote
    (``written_label``, for renames) gets its prior value back; one that is
    gone is re-added unless the sample has regained a label of that name
    since, which is a conflict.
    """
    field = step["field"]
    names = set(step["names"])
    written = step.get("written_label")
    path = "%s.classifications" % field
    coll = db.sample_coll(dataset)

    changed = set()
    for captures in _iter_capture_chunks(op, index, seq):
        docs = _current_docs(coll, [c["_id"] for c in captures], {path: 1})
        sample_ids, plans = [], []
        for capture in captures:
            labels = [
                label for label in _get_path(capture, path, default=None) or []
                if label.get("label") in names
            ]
            plan = _restore_labels_plan(
                capture["_id"], labels, docs.get(capture["_id"], {}), field,
                written, stats,
            )
            if plan is not None:
                sample_ids.append(capture["_id"])
                plans.append(plan)

        if sample_ids:
            new_field = {
                "$let": {
                    "vars": {"plan": _plan_expr(sample_ids, plans)},
                    "in": _restore_labels_expr(field, written),
                }
            }
            coll.update_many(
                {"_id": {"$in": sample_ids}},
                [{"$set": {field: new_field, "last_modified_at": "$$NOW"}}],
            )
            changed.update(sample_ids)

    return changed


def _plan_expr(sample_ids, plans):
    """The plan of the current sample, looked up in literal arrays, so that
    one pipeline update serves a whole capture chunk (one pipeline per
    sample cost 6x the server time, measured)."""
    return {
        "$arrayElemAt": [
            {"$literal": plans},
            {"$indexOfArray": [{"$literal": sample_ids}, "$_id"]},
        ]
    }


def _restore_labels_plan(sample_id, labels, doc, field, written, stats):
    """What putting one sample's captured ``labels`` back takes, given its
    current document: ``{"reset": [...], "add": [...]}``, or None if
    nothing. Labels that cannot go back are reported as conflicts."""
    current = (doc.get(field) or {}).get("classifications") or []
    by_id = {c.get("_id"): c for c in current}
    names = {c.get("label") for c in current}

    to_reset = []
    to_add = []
    for label in labels:
        now = by_id.get(label["_id"])
        if now is not None:
            if now == label:
                continue
            if written is not None and now.get("label") == written:
                to_reset.append(label)
            else:
                stats["conflicts"].append(
                    _conflict(sample_id, field, label, "label was changed")
                )
        elif label["label"] in names:
            stats["conflicts"].append(
                _conflict(sample_id, field, label, "concept was re-added")
            )
        else:
            to_add.append(label)

    if not to_reset and not to_add:
        return None
    return {"reset": to_reset, "add": to_add}


def _restore_labels_expr(field, written):
    """The restored label list, given the sample's plan in ``$$plan``.

    The conditions of the plan are re-checked server-side, so an edit that
    lands between the read of the plan and this write is never clobbered:
    a label goes back only if neither its id nor its concept is there, and
    a renamed one is reset only if it still holds the name written.
    """
    current = {"$ifNull": ["$%s.classifications" % field, []]}
    current_ids = {"$map": {"input": current, "in": "$$this._id"}}
    current_names = {"$map": {"input": current, "in": "$$this.label"}}
    kept = current
    if written is not None:
        kept = {
            "$map": {
                "input": current,
                "in": {
                    "$let": {
                        "vars": {
                            "prior": {
                                "$filter": {
                                    "input": "$$plan.reset",
                                    "as": "r",
                                    "cond": {"$eq": ["$$r._id", "$$this._id"]},
                                }
                            }
                        },
                        "in": {
                            "$cond": [
                                {
                                    "$and": [
                                        {"$gt": [{"$size": "$$prior"}, 0]},
                                        {"$eq": ["$$this.label", {"$literal": written}]},
                                    ]
                                },
                                {"$arrayElemAt": ["$$prior", 0]},
                                "$$this",
                            ]
                        },
                    }
                },
            }
        }

    addable = {
        "$filter": {
            "input": "$$plan.add",
            "cond": {
                "$and": [
                    {"$not": [{"$in": ["$$this._id", current_ids]}]},
                    {"$not": [{"$in": ["$$this.label", current_names]}]},
                ]
            },
        }
    }
    return db.classifications_expr(field, {"$concatArrays": [kept, addable]})


def _conflict(sample_id, field, label, reason):
    return {
        "sample_id": str(sample_id),
        "field": field,
        "label": label.get("label"),
        "reason": reason,
    }


def _undo_restore_values(dataset, op, index, step, seq, ids, stats):
    """Restores captured values where the sample still holds exactly what
    the operation wrote.

    ``step`` holds ``field``, ``keys`` (top-level keys of the field, or
    ``None`` for the whole field) and ``after_if_missing``: what the
    operation wrote on samples that held nothing there (those are not
    captured). A capture holds ``prior`` and ``after`` dicts keyed like
    ``keys`` (``""`` for the whole field); a missing key means "absent".
    """
    field = step["field"]
    keys = step["keys"] if step.get("keys") is not None else [""]
    coll = db.sample_coll(dataset)

    def path(key):
        return field if key == "" else "%s.%s" % (field, key)

    changed = set()
    captured = set()
    for captures in _iter_capture_chunks(op, index, seq):
        # What each sample would need restored, if it still holds it
        wanted = []
        for capture in captures:
            captured.add(capture["_id"])
            prior = capture.get("prior", {})
            after = capture.get("after", {})
            keys_written = [
                key for key in keys
                if not _same(prior.get(key, _MISSING), after.get(key, _MISSING))
            ]
            if keys_written:
                wanted.append((capture["_id"], prior, after, keys_written))

        if not wanted:
            continue

        docs = _current_docs(coll, [w[0] for w in wanted], {field: 1})
        sample_ids, plans = [], []
        for sample_id, prior, after, keys_written in wanted:
            doc = docs.get(sample_id, {})
            plan = []
            for key in keys:
                entry = {"restore": False}
                if key in keys_written:
                    # A key goes back into the field only while it is an
                    # object; a document replaced since is a conflict
                    in_place = key == "" or isinstance(doc.get(field), dict)
                    if in_place and _same(_get_path(doc, path(key)),
                                          after.get(key, _MISSING)):
                        entry = _value_plan(prior.get(key, _MISSING),
                                            after.get(key, _MISSING))
                    else:
                        stats["conflicts"].append(
                            {
                                "sample_id": str(sample_id),
                                "field": path(key),
                                "reason": "value was changed after the operation",
                            }
                        )
                plan.append(entry)

            if any(entry["restore"] for entry in plan):
                sample_ids.append(sample_id)
                plans.append(plan)

        if sample_ids:
            coll.update_many(
                {"_id": {"$in": sample_ids}},
                _restore_values_pipeline(field, keys, sample_ids, plans),
            )
            changed.update(sample_ids)

    # Samples that held nothing before: remove what the operation wrote
    after_if_missing = step.get("after_if_missing")
    if after_if_missing is not None:
        uncaptured = [i for i in ids.ids if i not in captured]
        conds = {
            key: _holds_expr(path(key), after_if_missing[key])
            for key in keys
            if key in after_if_missing
        }
        if uncaptured and conds:
            query = {"_id": {"$in": uncaptured}, "$expr": {"$or": list(conds.values())}}
            hits = coll.distinct("_id", query)
            if hits:
                coll.update_many(
                    {"_id": {"$in": hits}},
                    [
                        {
                            "$set": dict(
                                {
                                    path(key): {"$cond": [cond, "$$REMOVE", "$" + path(key)]}
                                    for key, cond in conds.items()
                                },
                                last_modified_at="$$NOW",
                            )
                        }
                    ],
                )
                changed.update(hits)

    return changed


#: A field the undo pipeline holds the sample's plan in while it runs (it is
#: removed in the same update)
_PLAN_FIELD = "__bulk_labeling_undo_plan"


def _value_plan(prior, after):
    """The plan entry that restores ``prior`` where the value is still
    ``after`` (either may be missing)."""
    return {
        "restore": True,
        "has_after": after is not _MISSING,
        "after": None if after is _MISSING else after,
        "has_prior": prior is not _MISSING,
        "prior": None if prior is _MISSING else prior,
    }


def _restore_values_pipeline(field, keys, sample_ids, plans):
    """The pipeline update that restores, on every sample of a capture
    chunk, the values its plan (one entry per key of ``keys``; ``""`` is the
    whole field) says to restore.

    Each value is re-checked server-side: it goes back only where the
    sample still holds what the operation wrote, so an edit that lands
    between the read of the plan and this write is never clobbered. Keys
    are restored by rebuilding the field, and only while it is an object (a
    ``$set`` of a dotted path would turn any other value into an object).
    Samples where nothing goes back keep their ``last_modified_at``.
    """
    def entry(position, name):
        return {
            "$getField": {
                "field": name,
                "input": {"$arrayElemAt": ["$" + _PLAN_FIELD, position]},
            }
        }

    current = "$" + field
    is_object = {"$eq": [{"$type": current}, "object"]}
    restores = []
    for position, key in enumerate(keys):
        value = current if key == "" else "%s.%s" % (current, key)
        holds = {
            "$cond": [
                entry(position, "has_after"),
                {"$eq": [value, entry(position, "after")]},
                {"$eq": [{"$type": value}, "missing"]},
            ]
        }
        if key != "":
            holds = {"$and": [is_object, holds]}
        restores.append({"$and": [entry(position, "restore"), holds]})

    if keys == [""]:
        prior = {
            "$cond": [entry(0, "has_prior"), entry(0, "prior"), "$$REMOVE"]
        }
        new_value = {"$cond": [restores[0], prior, current]}
    else:
        restored = [
            {
                "$cond": [
                    {"$and": [restore, entry(position, "has_prior")]},
                    {"$arrayToObject": [[{"k": {"$literal": key},
                                          "v": entry(position, "prior")}]]},
                    {},
                ]
            }
            for position, (key, restore) in enumerate(zip(keys, restores))
        ]
        removed = {
            "$concatArrays": [
                {
                    "$cond": [
                        {"$and": [restore, {"$not": [entry(position, "has_prior")]}]},
                        [{"$literal": key}],
                        [],
                    ]
                }
                for position, (key, restore) in enumerate(zip(keys, restores))
            ]
        }
        rebuilt = {
            "$arrayToObject": {
                "$filter": {
                    "input": {"$objectToArray": {"$mergeObjects": [current] + restored}},
                    "cond": {"$not": [{"$in": ["$$this.k", removed]}]},
                }
            }
        }
        new_value = {"$cond": [is_object, rebuilt, current]}

    return [
        {"$set": {_PLAN_FIELD: _plan_expr(sample_ids, plans)}},
        {
            "$set": {
                field: new_value,
                "last_modified_at": {
                    "$cond": [{"$or": restores}, "$$NOW", "$last_modified_at"]
                },
            }
        },
        {"$unset": _PLAN_FIELD},
    ]


class _Missing(object):
    def __repr__(self):
        return "<missing>"


_MISSING = _Missing()


def _holds_expr(path, value):
    if value is _MISSING:
        return {"$eq": [{"$type": "$" + path}, "missing"]}

    return {"$eq": ["$" + path, {"$literal": value}]}


def _same(a, b):
    """Equality as MongoDB's ``$eq`` sees it, so that the Python checks agree
    with the server-side conditions: numbers compare by value whatever their
    type, but a boolean is not a number (``True == 1`` in Python), and key
    order counts."""
    if a is _MISSING or b is _MISSING:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, numbers.Number) and isinstance(b, numbers.Number):
        return a == b
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and list(a) == list(b)
            and all(_same(a[k], b[k]) for k in a)
        )
    if isinstance(a, list):
        return (
            isinstance(b, list)
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b))
        )
    return type(a) is type(b) and a == b


def _get_path(doc, path, default=_MISSING):
    value = doc
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]

    return value


def _undo_delete_samples(dataset, op, index, step, seq, ids, stats):
    """Deletes the samples the operation added, unless they were modified
    after it."""
    ended_at = op.record.get("ended_at") or _now()
    coll = db.sample_coll(dataset)
    untouched = coll.distinct(
        "_id", ids.query({"last_modified_at": {"$lte": ended_at}})
    )
    for sample_id in set(ids.ids) - set(untouched):
        if coll.find_one({"_id": sample_id}, {"_id": 1}) is not None:
            stats["conflicts"].append(
                {
                    "sample_id": str(sample_id),
                    "reason": "sample was modified after it was added",
                }
            )

    if untouched:
        dataset.delete_samples([str(i) for i in untouched])

    return set(untouched)


_UNDO_STEPS = {
    "pull_labels": _undo_pull_labels,
    "restore_labels": _undo_restore_labels,
    "restore_values": _undo_restore_values,
    "delete_samples": _undo_delete_samples,
}
