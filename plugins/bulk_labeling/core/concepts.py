"""Concepts: the label vocabulary of a dataset.

Concepts are stored as :class:`fiftyone.core.labels.Classification` labels in a
:class:`fiftyone.core.labels.Classifications` field (``concepts`` by default).
Clarifai's "value 0", a concept known to be absent, is kept in a sibling field
``<field>_negative``. The vocabulary of a field is ``dataset.classes[field]``.
"""

import unicodedata

import fiftyone as fo
import fiftyone.core.labels as fol

from . import database as db
from . import history
from .errors import BulkLabelingError

DEFAULT_FIELD = "concepts"
NEGATIVE_SUFFIX = "_negative"
MAX_CONCEPT_LENGTH = 128

_RESERVED_FIELDS = {
    "id",
    "_id",
    "filepath",
    "tags",
    "metadata",
    "created_at",
    "last_modified_at",
    "media_type",
}


def normalize_concepts(concepts, allow_empty=False):
    """Validates concept names and returns them trimmed and deduplicated,
    in their original order.

    Names are case-sensitive, non-empty after trimming, at most
    :data:`MAX_CONCEPT_LENGTH` characters, and free of control characters.

    Args:
        concepts: a name or an iterable of names
        allow_empty (False): whether an empty list is acceptable

    Raises:
        BulkLabelingError: if any name is invalid
    """
    if concepts is None:
        concepts = []
    elif isinstance(concepts, str):
        concepts = [concepts]

    names = []
    for concept in concepts:
        if not isinstance(concept, str):
            raise BulkLabelingError(
                "Concept names must be strings, not %r" % (concept,)
            )

        name = concept.strip()
        if not name:
            raise BulkLabelingError("Concept names cannot be empty")

        if len(name) > MAX_CONCEPT_LENGTH:
            raise BulkLabelingError(
                "Concept '%s...' is longer than %d characters"
                % (name[:20], MAX_CONCEPT_LENGTH)
            )

        if any(unicodedata.category(c) == "Cc" for c in name):
            raise BulkLabelingError(
                "Concept %r contains control characters" % name
            )

        if name not in names:
            names.append(name)

    if not names and not allow_empty:
        raise BulkLabelingError("No concepts given")

    return names


def negative_field(field):
    """The field that holds the negative labels of ``field``."""
    return field + NEGATIVE_SUFFIX


def validate_field(dataset, field):
    """Checks that ``field`` can hold concepts, without writing anything.

    Returns:
        True if the field is already declared, False if it will be created
    """
    if not isinstance(field, str) or not field.strip():
        raise BulkLabelingError("The concepts field name cannot be empty")

    if field in _RESERVED_FIELDS or field.startswith("_") or "." in field:
        raise BulkLabelingError(
            "'%s' cannot hold concepts: choose another field name" % field
        )

    schema = dataset.get_field_schema()
    if field not in schema:
        return False

    ftype = schema[field]
    if not (
        isinstance(ftype, fo.EmbeddedDocumentField)
        and issubclass(ftype.document_type, fol.Classifications)
    ):
        raise BulkLabelingError(
            "Field '%s' exists but is a %s, not a Classifications field"
            % (field, type(ftype).__name__)
        )

    return True


def is_declared(dataset, field):
    return field in dataset.get_field_schema()


def ensure_field(dataset, field):
    """Declares ``field`` as a Classifications field if needed."""
    if not validate_field(dataset, field):
        dataset.add_sample_field(
            field,
            fo.EmbeddedDocumentField,
            embedded_doc_type=fol.Classifications,
        )


def add_to_vocabulary(dataset, field, concepts):
    """Adds concepts to ``dataset.classes[field]`` with one atomic
    ``$addToSet``, so that concurrent editors never lose each other's new
    concepts."""
    if not concepts:
        return

    conn = db.get_db()
    conn.datasets.update_one(
        {"_id": dataset._doc.id},
        {"$addToSet": {"classes.%s" % field: {"$each": list(concepts)}}},
    )
    dataset.reload()


def get_vocabulary(dataset, field=DEFAULT_FIELD):
    """Returns the concepts of ``dataset.classes[field]``."""
    return list(dataset.classes.get(field, []))


def create_concepts(dataset, concepts, field=DEFAULT_FIELD):
    """Creates concepts in the vocabulary (Clarifai's "Add new concept").

    Returns:
        the names that were new
    """
    names = normalize_concepts(concepts)
    ensure_field(dataset, field)
    existing = set(get_vocabulary(dataset, field))
    add_to_vocabulary(dataset, field, names)
    return [n for n in names if n not in existing]


def list_concepts(sample_collection, field=DEFAULT_FIELD):
    """Returns the vocabulary with per-concept counts in a collection.

    Returns:
        a list of ``{"name", "count", "negative_count"}`` dicts, in
        vocabulary order, followed by concepts found only in the samples
    """
    dataset = sample_collection._dataset
    validate_field(dataset, field)
    counts = _count_labels(sample_collection, field)
    neg_counts = _count_labels(sample_collection, negative_field(field))

    names = get_vocabulary(dataset, field)
    names += sorted(n for n in set(counts) | set(neg_counts) if n not in names)
    return [
        {
            "name": n,
            "count": counts.get(n, 0),
            "negative_count": neg_counts.get(n, 0),
        }
        for n in names
    ]


def _count_labels(sample_collection, field):
    if not is_declared(sample_collection._dataset, field):
        return {}

    counts = sample_collection.count_values("%s.classifications.label" % field)
    return {k: v for k, v in counts.items() if k is not None}


def _label_fields(dataset, field):
    fields = [field]
    if is_declared(dataset, negative_field(field)):
        fields.append(negative_field(field))

    return fields


def iter_rename_concept(dataset, old, new, field=DEFAULT_FIELD,
                        dry_run=False, user=None):
    """Renames a concept in the vocabulary and on every sample, keeping the
    labels' ids. A sample that already has ``new`` loses its ``old`` label.

    A generator of :class:`Progress`; returns ``{"operation_id", "matched",
    "changed"}``.
    """
    (old,) = normalize_concepts(old)
    (new,) = normalize_concepts(new)
    if old == new:
        raise BulkLabelingError("The new name is the same as the old one")

    validate_field(dataset, field)
    if old not in get_vocabulary(dataset, field) and not _holders_query(
        dataset, field, old, count=True
    ):
        raise BulkLabelingError(
            "Concept '%s' does not exist in field '%s'" % (old, field)
        )

    params = {"old": old, "new": new, "field": field}
    return (yield from _run_vocabulary_op(
        dataset, "rename_concept", params, old, dry_run, user,
        written_label=new,
    ))


def iter_delete_concept(dataset, name, field=DEFAULT_FIELD, dry_run=False,
                        user=None):
    """Deletes a concept from the vocabulary and from every sample.

    A generator of :class:`Progress`; returns ``{"operation_id", "matched",
    "changed"}``.
    """
    (name,) = normalize_concepts(name)
    validate_field(dataset, field)
    if name not in get_vocabulary(dataset, field) and not _holders_query(
        dataset, field, name, count=True
    ):
        raise BulkLabelingError(
            "Concept '%s' does not exist in field '%s'" % (name, field)
        )

    params = {"name": name, "field": field}
    return (yield from _run_vocabulary_op(
        dataset, "delete_concept", params, name, dry_run, user,
        written_label=None,
    ))


def _holders_query(dataset, field, name, count=False):
    query = {
        "$or": [
            {"%s.classifications.label" % f: name}
            for f in _label_fields(dataset, field)
        ]
    }
    if count:
        return db.sample_coll(dataset).count_documents(query, limit=1)

    return query


def _run_vocabulary_op(dataset, op_type, params, name, dry_run, user,
                       written_label):
    field = params["field"]
    query = _holders_query(dataset, field, name)
    coll = db.sample_coll(dataset)

    if dry_run:
        matched = coll.count_documents(query)
        return {"operation_id": None, "matched": matched, "changed": matched,
                "dry_run": True}

    fields = _label_fields(dataset, field)
    inverse = [
        {"kind": "restore_labels", "field": f, "names": [name],
         "written_label": written_label}
        for f in fields
    ]
    params = dict(params, fields=fields)
    op = yield from history.run_operation(
        dataset,
        op_type,
        params,
        inverse,
        db.iter_query_id_batches(dataset, query),
        _write_vocabulary_op,
        target={"kind": "query", "concept": name},
        user=user,
    )

    vocab_path = "classes.%s" % field
    if op_type == "rename_concept":
        new = params["new"]
        vocab = {"$ifNull": ["$" + vocab_path, []]}
        renamed = {
            "$cond": [
                {"$in": [{"$literal": new}, vocab]},
                {"$filter": {"input": vocab, "cond": {"$ne": ["$$this", {"$literal": name}]}}},
                {
                    "$map": {
                        "input": vocab,
                        "in": {"$cond": [{"$eq": ["$$this", {"$literal": name}]}, {"$literal": new}, "$$this"]},
                    }
                },
            ]
        }
        update = [{"$set": {vocab_path: renamed}}]
    else:
        update = {"$pull": {vocab_path: name}}

    db.get_db().datasets.update_one({"_id": dataset._doc.id}, update)
    dataset.reload()

    return {
        "operation_id": op.operation_id,
        "matched": op.record["matched"],
        "changed": op.record["changed"],
    }


def _write_vocabulary_op(dataset, op):
    params = op.params
    name = params.get("old", params.get("name"))
    new = params.get("new")
    coll = db.sample_coll(dataset)

    # One atomic update per sample covers both polarities, so `changed`
    # counts samples, not fields
    sets = {"last_modified_at": "$$NOW"}
    for field in params["fields"]:
        sets[field] = _relabel_expr(field, name, new)
    holds_name = {"$or": [{"%s.classifications.label" % f: name}
                          for f in params["fields"]]}

    def write_batch(seq, ids):
        for step, field in enumerate(params["fields"]):
            op.capture_labels(ids, field, [name], step, seq)

        res = coll.update_many(ids.query(holds_name), [{"$set": sets}])
        return len(ids), res.modified_count

    yield from op.run_batches(write_batch, op.type)


def _relabel_expr(field, name, new):
    """The new value of a Classifications field once ``name`` is renamed to
    ``new`` (or deleted when ``new`` is None). Samples without the field
    keep it missing."""
    current = "$%s.classifications" % field
    without = {
        "$filter": {
            "input": current,
            "cond": {"$ne": ["$$this.label", {"$literal": name}]},
        }
    }
    if new is None:
        new_list = without
    else:
        renamed = {
            "$map": {
                "input": current,
                "in": {
                    "$cond": [
                        {"$eq": ["$$this.label", {"$literal": name}]},
                        {"$mergeObjects": ["$$this", {"label": {"$literal": new}}]},
                        "$$this",
                    ]
                },
            }
        }
        # A sample that already has `new` just loses `name`
        new_list = {
            "$cond": [
                {"$in": [{"$literal": new}, current + ".label"]},
                without,
                renamed,
            ]
        }

    return {
        "$cond": [
            {"$isArray": current},
            db.classifications_expr(field, new_list),
            "$" + field,
        ]
    }


history.register_writer("rename_concept", _write_vocabulary_op)
history.register_writer("delete_concept", _write_vocabulary_op)
