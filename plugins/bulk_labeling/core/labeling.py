"""Label as...: add or remove concepts on many samples at once.

One pipeline ``update_many`` per batch of 100k sample ids does all the work
server-side: new labels get unique ObjectIds built from the operation's id
prefixes and each sample's id (see
:func:`bulk_labeling.core.database.allocate_id_prefixes`), so nothing is read
into Python and concurrent editors never lose each other's labels.
"""

from . import concepts as conc
from . import database as db
from . import history
from .errors import BulkLabelingError

OPERATION_TYPE = "label_as"


def iter_label(sample_collection, add=None, remove=None,
               field=conc.DEFAULT_FIELD, negative=False, dry_run=False,
               user=None, target=None):
    """Adds and/or removes concepts on every sample of a collection.

    A generator of :class:`bulk_labeling.core.progress.Progress` events; use
    :func:`label` for a plain call.

    Returns:
        ``{"operation_id", "matched", "changed"}``, plus ``"dry_run": True``
        for a dry run
    """
    db.require_sample_view(sample_collection)
    dataset = sample_collection._dataset
    add = conc.normalize_concepts(add, allow_empty=True)
    remove = conc.normalize_concepts(remove, allow_empty=True)
    if not add and not remove:
        raise BulkLabelingError("No concepts given to add or remove")

    both = set(add) & set(remove)
    if both:
        raise BulkLabelingError(
            "Concepts cannot be added and removed at once: %s"
            % ", ".join(sorted(both))
        )

    conc.validate_field(dataset, field)
    neg = conc.negative_field(field)
    conc.validate_field(dataset, neg)
    target_field, other_field = (neg, field) if negative else (field, neg)
    if not add:
        # Removing never touches the other polarity
        other_field = None
    elif not conc.is_declared(dataset, other_field):
        other_field = None

    matched = sample_collection.count()
    if matched == 0:
        raise BulkLabelingError("No samples are targeted")

    params = {
        "add": add,
        "remove": remove,
        "field": field,
        "negative": bool(negative),
        "target_field": target_field,
        "other_field": other_field,
    }

    if dry_run:
        coll = db.sample_coll(dataset)
        changed = 0
        for ids in db.iter_id_batches(sample_collection, matched):
            changed += coll.count_documents(_changed_query(params, ids))

        return {"operation_id": None, "matched": matched, "changed": changed,
                "dry_run": True}

    conc.ensure_field(dataset, target_field)
    if add:
        conc.add_to_vocabulary(dataset, field, add)

    inverse = [
        {
            "kind": "pull_labels",
            "field": target_field,
            "prefixes": db.allocate_id_prefixes(dataset, len(add)),
        },
        {"kind": "restore_labels", "field": target_field, "names": remove},
    ]
    if other_field:
        inverse.append(
            {"kind": "restore_labels", "field": other_field, "names": add}
        )

    op = yield from history.run_operation(
        dataset,
        OPERATION_TYPE,
        params,
        inverse,
        db.iter_id_batches(sample_collection, matched),
        _write,
        target=target or {"kind": "view", "size": matched},
        user=user,
    )
    return {
        "operation_id": op.operation_id,
        "matched": op.record["matched"],
        "changed": op.record["changed"],
    }


def label(sample_collection, add=None, remove=None, field=conc.DEFAULT_FIELD,
          negative=False, dry_run=False, progress=None):
    """Adds and/or removes concepts on every sample of a dataset or view.

    Concepts not yet in ``dataset.classes[field]`` are created on the spot.
    Adding is idempotent; removing deletes every label of those concepts in
    the field. With ``negative=True`` the concepts are recorded as known to
    be absent, in ``<field>_negative``; a sample never holds a concept both
    ways.

    Example::

        import bulk_labeling as bl

        bl.label(dataset.select(ids), add=["cat", "pet"])
        bl.label(dataset.match_tags("validated"), remove=["dog"])

    Args:
        sample_collection: a :class:`fiftyone.core.collections.SampleCollection`
        add (None): a concept or list of concepts to add
        remove (None): a concept or list of concepts to remove
        field ("concepts"): the Classifications field
        negative (False): whether to add/remove negative labels
        dry_run (False): count what would change without writing
        progress (None): whether to render a progress bar, or a callback

    Returns:
        ``{"operation_id", "matched", "changed"}``
    """
    from .progress import run

    return run(
        iter_label(sample_collection, add=add, remove=remove, field=field,
                   negative=negative, dry_run=dry_run),
        progress=progress,
    )


def _changed_query(params, ids):
    target = params["target_field"] + ".classifications.label"
    conditions = [{target: {"$ne": name}} for name in params["add"]]
    if params["remove"]:
        conditions.append({target: {"$in": params["remove"]}})

    if params["other_field"]:
        other = params["other_field"] + ".classifications.label"
        conditions.append({other: {"$in": params["add"]}})

    return ids.query({"$or": conditions})


def _new_label_expr(name, prefix):
    return {
        "_id": db.generated_id_expr(prefix, tail="$$id_tail"),
        "_cls": "Classification",
        "tags": [],
        "label": {"$literal": name},
    }


def _update_pipeline(params, prefixes):
    target = params["target_field"]
    add, remove = params["add"], params["remove"]

    current = "$$current"
    kept = current
    if remove:
        kept = {
            "$filter": {
                "input": current,
                "cond": {"$not": [{"$in": ["$$this.label", {"$literal": remove}]}]},
            }
        }

    added = [
        {
            "$cond": [
                {"$in": [{"$literal": name}, current + ".label"]},
                [],
                [_new_label_expr(name, prefix)],
            ]
        }
        for name, prefix in zip(add, prefixes)
    ]
    new_list = {"$concatArrays": [kept] + added}
    target_value = {
        "$let": {
            "vars": {
                "current": {"$ifNull": ["$%s.classifications" % target, []]},
                "id_tail": db.SAMPLE_ID_TAIL_EXPR,
            },
            "in": db.classifications_expr(target, new_list),
        }
    }
    sets = {target: target_value, "last_modified_at": "$$NOW"}

    other = params["other_field"]
    if other:
        kept_other = {
            "$filter": {
                "input": {"$ifNull": ["$%s.classifications" % other, []]},
                "cond": {"$not": [{"$in": ["$$this.label", {"$literal": add}]}]},
            }
        }
        sets[other] = {
            "$cond": [
                {"$eq": [{"$type": "$" + other}, "object"]},
                db.classifications_expr(other, kept_other),
                "$" + other,
            ]
        }

    return [{"$set": sets}]


def _write(dataset, op):
    params = op.params
    prefixes = op.inverse[0]["prefixes"]
    pipeline = _update_pipeline(params, prefixes)
    coll = db.sample_coll(dataset)

    def write_batch(seq, ids):
        # Capture what the write will destroy, before writing
        if params["remove"]:
            op.capture_labels(ids, params["target_field"], params["remove"], 1, seq)

        if params["other_field"]:
            op.capture_labels(ids, params["other_field"], params["add"], 2, seq)

        res = coll.update_many(_changed_query(params, ids), pipeline)
        return len(ids), res.modified_count

    yield from op.run_batches(write_batch, "Labeling")


history.register_writer(OPERATION_TYPE, _write)
