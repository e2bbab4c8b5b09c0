"""Bulk metadata: validated JSON objects on many samples at once.

The user's JSON lives in a field of its own (``custom_metadata`` by default);
FiftyOne's ``metadata`` field is reserved for media metadata.

This module's validation is shared by every path that writes metadata:
:func:`parse_metadata` checks a payload, and a per-dataset JSON Schema (see
:func:`set_metadata_schema`) checks each resulting sample document
(:func:`validate_documents`).

Writes follow the package's conventions (see ``docs/ARCHITECTURE.md``): bulk
``update_many`` calls per batch of sample ids (journaled through
:func:`bulk_labeling.core.history.run_operation`), whose filters select
exactly the samples that change, with every user value wrapped in
``$literal`` in pipelines. Each sample's update is atomic and computed from
its *current* document on the server, so concurrent editors of different
keys never lose each other's writes. A merge is a ``$set`` of dotted paths
on the samples where that is exact (every object on the way is an object or
absent: see :func:`_merge_plan`) and a pipeline update (``$mergeObjects``)
on the others; overwrite is a ``$set`` of the field; remove and geolocations
are pipeline updates.

Every write is undoable: before writing, what it destroys is captured
server-side for the journal's ``restore_values`` inverse steps (see
:func:`_inverse`), with ``after`` values computed by the same expressions as
the write.

How the server-side expressions stay exact:

-   keys are validated (no leading ``$``, no ``.``), so they are safe both as
    names in expression objects and as components of field paths;
-   a field path such as ``$custom_metadata.site`` only ever yields an object
    when every component on the way is an object (through an array it yields
    an array), and every expression checks ``$type == "object"`` before it
    treats a value as one, so arrays and scalars are replaced, never merged.
"""

import json
import logging
import math
import numbers

import fiftyone as fo
import fiftyone.core.fields as fof
import fiftyone.core.labels as fol
import fiftyone.core.odm.utils as foou
import jsonschema

from . import database as db
from . import history
from .errors import BulkLabelingError
from .progress import Progress

logger = logging.getLogger(__name__)

DEFAULT_FIELD = "custom_metadata"

#: Default field of :func:`set_geolocation`; the name FiftyOne's Map panel
#: and ``geo_near``/``geo_within`` look for first
DEFAULT_GEO_FIELD = "location"

#: The edit modes of :func:`edit_metadata`
MODES = ("merge", "overwrite", "remove")

OPERATION_TYPE = "edit_metadata"
GEO_OPERATION_TYPE = "set_geolocation"

#: The largest payload accepted, in bytes of its JSON encoding
MAX_PAYLOAD_BYTES = 1024 * 1024

#: The deepest nesting accepted (the top-level object is depth 1; every
#: object or array level adds one). MongoDB allows 100 levels per stored
#: document and about 180 per command; the merge and remove expressions
#: take up to 5 command levels per payload level, so 20 keeps every write,
#: capture and undo well inside both limits
MAX_DEPTH = 20

#: At most this many offending samples are named in a schema error
MAX_REPORTED_SAMPLES = 10

#: At most this many top-level keys of a field are declared in the dataset's
#: schema (sidebar filters); further keys stay queryable with ``F()``
MAX_DECLARED_KEYS = 1000

#: Keys that FiftyOne interprets inside embedded documents
_RESERVED_KEYS = {"_cls"}

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

#: Where schemas are stored: ``dataset.info[_INFO_KEY]["schemas"][field]``,
#: as JSON text (JSON Schema keywords such as ``$schema`` and ``$ref`` are
#: not valid MongoDB field names)
_INFO_KEY = "bulk_labeling"



# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def parse_metadata(payload, allow_empty=True):
    """Parses and validates a metadata payload.

    Rules: it must parse as JSON (when given as text) and be a JSON object;
    keys are non-empty strings with no leading ``$`` and no ``.``, so that
    no MongoDB operator or path can be smuggled in, and ``_cls`` is reserved
    by FiftyOne; the encoded payload is at most :data:`MAX_PAYLOAD_BYTES`,
    nested at most :data:`MAX_DEPTH` deep; numbers are finite.

    Args:
        payload: a dict, or its JSON text
        allow_empty (True): whether ``{}`` is acceptable

    Returns:
        the payload as a dict

    Raises:
        BulkLabelingError: if the payload breaks a rule
    """
    if payload is None:
        raise BulkLabelingError("No metadata given")

    if isinstance(payload, (bytes, bytearray)):
        try:
            payload = payload.decode("utf-8", errors="strict")
        except UnicodeDecodeError as e:
            raise BulkLabelingError("Metadata is not valid UTF-8: %s" % e)

    if isinstance(payload, str):
        if len(payload.encode("utf-8")) > MAX_PAYLOAD_BYTES:
            raise BulkLabelingError(
                "Metadata is larger than %d bytes" % MAX_PAYLOAD_BYTES
            )
        if not payload.strip():
            raise BulkLabelingError("No metadata given")
        try:
            payload = json.loads(payload, parse_constant=_reject_constant)
        except json.JSONDecodeError as e:
            raise BulkLabelingError("Metadata is not valid JSON: %s" % e)
        except RecursionError:
            raise BulkLabelingError(
                "Metadata is nested more than %d levels deep" % MAX_DEPTH
            )

    if not isinstance(payload, dict):
        raise BulkLabelingError(
            "Metadata must be a JSON object, not %s" % _json_type(payload)
        )

    _check_value(payload, "", 1)

    try:
        encoded = json.dumps(payload, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BulkLabelingError("Metadata is not JSON-serializable: %s" % e)

    if len(encoded.encode("utf-8")) > MAX_PAYLOAD_BYTES:
        raise BulkLabelingError(
            "Metadata is larger than %d bytes" % MAX_PAYLOAD_BYTES
        )

    if not payload and not allow_empty:
        raise BulkLabelingError("Metadata is an empty object")

    return payload


def _reject_constant(name):
    # json.loads accepts NaN, Infinity and -Infinity, which are not JSON
    raise BulkLabelingError(
        "Metadata contains %s, which is not a finite number" % name
    )


def _check_value(value, path, depth):
    if depth > MAX_DEPTH:
        raise BulkLabelingError(
            "Metadata is nested more than %d levels deep at '%s'"
            % (MAX_DEPTH, path)
        )

    if isinstance(value, dict):
        for key, child in value.items():
            _check_key(key, path)
            _check_value(child, _join(path, key), depth + 1)
    elif isinstance(value, (list, tuple)):
        for index, child in enumerate(value):
            _check_value(child, "%s[%d]" % (path, index), depth + 1)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise BulkLabelingError(
                "Metadata value at '%s' is not a finite number" % path
            )
    elif isinstance(value, int) and not isinstance(value, bool):
        if not -(2 ** 63) <= value < 2 ** 63:
            raise BulkLabelingError(
                "Metadata value at '%s' does not fit in 64 bits" % path
            )
    elif value is not None and not isinstance(value, (str, bool)):
        raise BulkLabelingError(
            "Metadata value at '%s' is a %s, not a JSON value"
            % (path, type(value).__name__)
        )


def _check_key(key, path):
    where = " in '%s'" % path if path else ""
    if not isinstance(key, str):
        raise BulkLabelingError("Metadata key %r%s is not a string" % (key, where))
    if not key:
        raise BulkLabelingError("Metadata keys cannot be empty%s" % where)
    if key.startswith("$"):
        raise BulkLabelingError(
            "Metadata key '%s'%s cannot start with '$'" % (key, where)
        )
    if "." in key:
        raise BulkLabelingError(
            "Metadata key '%s'%s cannot contain '.'" % (key, where)
        )
    if "\x00" in key:
        raise BulkLabelingError(
            "Metadata key %r%s cannot contain NUL characters" % (key, where)
        )
    if key in _RESERVED_KEYS:
        raise BulkLabelingError(
            "Metadata key '%s'%s is reserved by FiftyOne" % (key, where)
        )


def _join(path, key):
    return key if not path else "%s.%s" % (path, key)


def _json_type(value):
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if value is None:
        return "null"
    return "a %s" % type(value).__name__


def parse_remove_spec(payload):
    """Parses the payload of a ``remove``: an object whose leaves are
    ``true``, e.g. ``{"camera": true, "site": {"row": true}}``.

    Returns:
        the spec as a dict
    """
    spec = parse_metadata(payload, allow_empty=False)
    _check_remove_spec(spec, "")
    return spec


def _check_remove_spec(spec, path):
    if not spec:
        raise BulkLabelingError(
            "Nothing to remove under '%s': give its keys with the value true"
            % path
        )
    for key, value in spec.items():
        where = _join(path, key)
        if isinstance(value, dict):
            _check_remove_spec(value, where)
        elif value is not True:
            raise BulkLabelingError(
                "To remove a key, give it the value true, e.g. "
                '{"camera": true, "site": {"row": true}}; \'%s\' is %s'
                % (where, _json_type(value))
            )


def parse_mode(mode):
    mode = mode or "merge"
    if mode not in MODES:
        raise BulkLabelingError(
            "mode must be one of %s, not %r" % (", ".join(MODES), mode)
        )
    return mode


def parse_payload(metadata, mode):
    """Parses the payload of an edit in the given mode."""
    mode = parse_mode(mode)
    if mode == "remove":
        return parse_remove_spec(metadata)
    return parse_metadata(metadata, allow_empty=(mode == "overwrite"))


def validate_field_name(field):
    """Checks that ``field`` can hold user metadata."""
    if not isinstance(field, str) or not field.strip():
        raise BulkLabelingError("The metadata field name cannot be empty")
    if field in _RESERVED_FIELDS or field.startswith("_") or "." in field:
        raise BulkLabelingError(
            "'%s' is reserved; choose another field for custom metadata"
            % field
        )
    if field.startswith("$") or "\x00" in field:
        raise BulkLabelingError("'%s' is not a valid field name" % field)
    return field


def check_metadata_field(dataset, field):
    """Checks that ``field`` can hold metadata on ``dataset``, without
    writing anything.

    Returns:
        True if the field is already declared, False if it will be created
    """
    validate_field_name(field)
    schema = dataset.get_field_schema()
    if field not in schema:
        return False

    ftype = schema[field]
    if not (
        isinstance(ftype, fof.EmbeddedDocumentField)
        and issubclass(ftype.document_type, fo.DynamicEmbeddedDocument)
        and not issubclass(ftype.document_type, fol.Label)
    ):
        raise BulkLabelingError(
            "Field '%s' exists but is a %s, not a custom metadata field"
            % (field, _describe_field(ftype))
        )

    return True


def _describe_field(ftype):
    if isinstance(ftype, fof.EmbeddedDocumentField):
        return "%s field" % ftype.document_type.__name__
    return type(ftype).__name__


# --------------------------------------------------------------------------
# Python twins of the server-side edits (previews and schema validation)
# --------------------------------------------------------------------------


def deep_merge(base, payload):
    """Merges ``payload`` into ``base``: objects deep-merge; scalars and
    arrays are replaced. Existing keys keep their place; new keys are
    appended in sorted order (the order in which MongoDB's update operators
    add fields). Returns a new dict; neither input is modified.

    This is the Python twin of the server-side merge, used to validate the
    resulting documents against a schema before anything is written, and to
    preview them.
    """
    if not isinstance(base, dict):
        base = {}

    merged = dict(base)
    for key, value in sorted(payload.items()):
        if isinstance(value, dict):
            merged[key] = deep_merge(merged.get(key), value)
        else:
            merged[key] = value

    return merged


def remove_keys(base, spec):
    """Removes the keys of a remove spec from ``base``: nested keys go, their
    parents stay. Returns a new dict (or ``base`` itself if it is not a
    dict); neither input is modified."""
    if not isinstance(base, dict):
        return base

    result = {}
    for key, value in base.items():
        rule = spec.get(key)
        if rule is True:
            continue
        if isinstance(rule, dict) and isinstance(value, dict):
            value = remove_keys(value, rule)
        result[key] = value

    return result


def apply_edit(current, payload, mode):
    """Returns what a sample's document becomes after an edit (the Python
    twin of the server-side write)."""
    if mode == "merge":
        return deep_merge(current, payload)
    if mode == "overwrite":
        return json.loads(json.dumps(payload))
    return remove_keys(current, payload)


def user_document(value):
    """The user's view of a stored metadata document: FiftyOne's ``_cls``
    marker (added when a sample is saved through FiftyOne) is dropped."""
    if not isinstance(value, dict):
        return value
    return {k: v for k, v in value.items() if k != "_cls"}


# --------------------------------------------------------------------------
# JSON Schema
# --------------------------------------------------------------------------


def parse_schema(schema):
    """Parses a JSON Schema (text or dict) and checks it is itself valid.

    Returns:
        the schema as a dict, or None for an empty schema (clear it)
    """
    if schema is None or (isinstance(schema, str) and not schema.strip()):
        return None

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise BulkLabelingError("Schema is not valid JSON: %s" % e)

    if not isinstance(schema, dict):
        raise BulkLabelingError("A JSON Schema must be a JSON object")

    if not schema:
        return None

    validator_cls = jsonschema.validators.validator_for(schema)
    try:
        validator_cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise BulkLabelingError("Invalid JSON Schema: %s" % e.message)

    return schema


def schema_validator(schema):
    """Returns a ``jsonschema`` validator for a parsed schema."""
    validator_cls = jsonschema.validators.validator_for(schema)
    return validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)


def schema_errors(validator, document):
    """Returns jsonschema's messages for one document (empty if valid)."""
    return [
        "%s: %s" % ("/".join(str(p) for p in e.absolute_path) or "(root)", e.message)
        for e in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    ]


def _schema_path(field):
    return "info.%s.schemas.%s" % (_INFO_KEY, field)


def get_metadata_schema(dataset, field=DEFAULT_FIELD):
    """Returns the JSON Schema of a metadata field, or None.

    The schema is read from the database, so a schema set by another process
    is seen at once.
    """
    dataset = dataset._dataset
    record = db.get_db().datasets.find_one(
        {"_id": dataset._doc.id}, {_schema_path(field): 1}
    )
    value = record or {}
    for part in ("info", _INFO_KEY, "schemas", field):
        value = value.get(part) if isinstance(value, dict) else None

    if not value:
        return None

    if isinstance(value, str):
        return json.loads(value)

    return value


def iter_set_metadata_schema(dataset, schema, field=DEFAULT_FIELD, user=None):
    """Sets (or, with an empty schema, clears) the JSON Schema of a metadata
    field and counts the existing samples that violate it.

    A generator of :class:`Progress`; see :func:`set_metadata_schema`.
    """
    dataset = dataset._dataset
    db.require_sample_view(dataset)
    check_metadata_field(dataset, field)
    parsed = parse_schema(schema)

    datasets = db.get_db().datasets
    path = _schema_path(field)
    try:
        if parsed is None:
            datasets.update_one({"_id": dataset._doc.id}, {"$unset": {path: ""}})
        else:
            datasets.update_one(
                {"_id": dataset._doc.id},
                {"$set": {path: json.dumps(parsed, sort_keys=False)}},
            )
    except Exception as e:
        raise BulkLabelingError(
            "Could not store the schema in dataset.info['%s']: %s"
            % (_INFO_KEY, e)
        )

    dataset.reload()
    logger.info(
        "%s the metadata schema of field '%s' on dataset '%s'%s",
        "Cleared" if parsed is None else "Set",
        field,
        dataset.name,
        " (by %s)" % user if user else "",
    )

    result = {
        "field": field,
        "schema": "cleared" if parsed is None else "set",
        "checked": 0,
        "violations": 0,
        "violating_samples": [],
    }
    if parsed is None:
        return result

    validator = schema_validator(parsed)
    coll = db.sample_coll(dataset)
    query = {field: {"$type": "object"}}
    total = dataset.count()
    cursor = coll.find(query, {field: 1, "filepath": 1}, batch_size=10000)
    for doc in cursor:
        result["checked"] += 1
        errors = schema_errors(validator, user_document(doc.get(field)))
        if errors:
            result["violations"] += 1
            if len(result["violating_samples"]) < MAX_REPORTED_SAMPLES:
                result["violating_samples"].append(
                    {
                        "sample_id": str(doc["_id"]),
                        "filepath": doc.get("filepath"),
                        "errors": errors,
                    }
                )

        if result["checked"] % 10000 == 0:
            yield Progress(result["checked"], total, "Checking samples")

    return result


def set_metadata_schema(dataset, schema, field=DEFAULT_FIELD, progress=None):
    """Sets the JSON Schema that every sample document of a metadata field
    must satisfy, or clears it.

    The schema itself is checked first (with ``jsonschema``), then stored
    with the dataset (in ``dataset.info["bulk_labeling"]["schemas"]``). From
    then on every :func:`edit_metadata` and every upload validates each
    resulting sample document against it before writing anything. Existing
    samples are not changed; the ones that violate the schema are counted.

    Example::

        import bulk_labeling as bl

        bl.set_metadata_schema(dataset, {
            "type": "object",
            "properties": {"camera": {"type": "string"}},
            "required": ["camera"],
        })

    Args:
        dataset: the dataset
        schema: a JSON Schema, as a dict or JSON text; None, ``""`` or
            ``{}`` clears it
        field ("custom_metadata"): the metadata field
        progress (None): whether to render a progress bar, or a callback

    Returns:
        ``{"field", "schema": "set"|"cleared", "checked", "violations",
        "violating_samples"}``, where ``checked`` counts the samples that
        hold a document, ``violations`` those that violate the schema and
        ``violating_samples`` names up to 10 with jsonschema's messages
    """
    from .progress import run

    return run(iter_set_metadata_schema(dataset, schema, field=field),
               progress=progress)


def validate_documents(dataset, field, documents, schema=None):
    """Validates resulting sample documents against the field's JSON Schema.

    A no-op when the field has no schema. ``documents`` is streamed: memory
    stays bounded however many there are.

    Args:
        dataset: the dataset
        field: the metadata field
        documents: an iterable of ``(sample_label, document)``, where
            ``sample_label`` names the sample in error messages and
            ``document`` is the sample's metadata after the write (None for a
            sample left without a document, which is not checked)
        schema (None): a parsed schema to use instead of the stored one

    Returns:
        the number of documents checked

    Raises:
        BulkLabelingError: naming up to 10 offending samples with
            jsonschema's messages, if any document violates the schema
    """
    if schema is None:
        schema = get_metadata_schema(dataset, field)
    if schema is None:
        return 0

    validator = schema_validator(schema)
    checked = 0
    bad = []
    num_bad = 0
    for label, document in documents:
        if document is None:
            continue
        checked += 1
        errors = schema_errors(validator, user_document(document))
        if errors:
            num_bad += 1
            if len(bad) < MAX_REPORTED_SAMPLES:
                bad.append((label, errors))

    if num_bad:
        lines = [
            "%d sample(s) would violate the JSON Schema of field '%s'; "
            "nothing was written:" % (num_bad, field)
        ]
        for label, errors in bad:
            lines.append("- %s: %s" % (label, "; ".join(errors)))
        if num_bad > len(bad):
            lines.append("... and %d more" % (num_bad - len(bad)))
        raise BulkLabelingError("\n".join(lines))

    return checked


# --------------------------------------------------------------------------
# Field declarations
# --------------------------------------------------------------------------


def ensure_metadata_field(dataset, field, documents=None):
    """Declares a metadata field and the top-level keys written to it, so
    that they can be filtered on in the App's sidebar.

    The field is an ``EmbeddedDocumentField(fo.DynamicEmbeddedDocument)``;
    each top-level key gets the FiftyOne field type implied by its value, as
    FiftyOne's own ``add_dynamic_sample_fields`` would declare it (``str`` ->
    ``StringField``, ``int`` -> ``IntField``, ``float`` -> ``FloatField``,
    ``bool`` -> ``BooleanField``, arrays -> ``ListField``, objects ->
    ``DictField``). A key declared ``IntField`` that receives a float is
    widened to ``FloatField``; other type changes keep the first declaration.
    Filtering in Python views (``F("custom_metadata.camera")``) works for
    every key, declared or not.

    Args:
        dataset: the dataset
        field: the metadata field
        documents (None): an iterable of documents (dicts) about to be
            written, whose top-level keys are declared. When None, only the
            field itself is declared; call it again with the documents (or
            after the write, with ``documents="stored"`` to scan the stored
            values) to declare the keys
    """
    dataset = dataset._dataset
    if not check_metadata_field(dataset, field):
        dataset.add_sample_field(
            field,
            fof.EmbeddedDocumentField,
            embedded_doc_type=fo.DynamicEmbeddedDocument,
        )

    if documents is None:
        return

    if documents == "stored":
        documents = [_stored_examples(dataset, field)]

    schema = dataset.get_field_schema(flat=True)
    declared = [p for p in schema if p.startswith(field + ".")]
    new = {}
    widen = []
    for document in documents:
        if not isinstance(document, dict):
            continue
        for key, value in document.items():
            if value is None or key.startswith("_"):
                continue
            path = "%s.%s" % (field, key)
            current = schema.get(path)
            if current is None:
                if path in new:
                    continue
                if len(declared) + len(new) >= MAX_DECLARED_KEYS:
                    logger.warning(
                        "Field '%s' has %d declared keys; '%s' is not "
                        "declared (it can still be queried with F())",
                        field, MAX_DECLARED_KEYS, key,
                    )
                    continue
                try:
                    new[path] = foou.create_implied_field(path, value)
                except (TypeError, ValueError):
                    continue
            elif (
                type(current) is fof.IntField
                and isinstance(value, float)
                and path not in widen
            ):
                widen.append(path)

    for path in widen:
        dataset.remove_dynamic_sample_field(path)
        new[path] = fof.FloatField()
        new[path].name = path.rsplit(".", 1)[-1]

    if new:
        dataset.add_dynamic_sample_fields(fields=new)


def _stored_examples(dataset, field):
    """One example value per top-level key found in the stored documents,
    computed server-side."""
    pipeline = [
        {"$match": {field: {"$type": "object"}}},
        {"$project": {"kv": {"$objectToArray": "$" + field}}},
        {"$unwind": "$kv"},
        {"$match": {"kv.v": {"$ne": None}}},
        {"$group": {"_id": "$kv.k", "v": {"$first": "$kv.v"}}},
        {"$limit": MAX_DECLARED_KEYS},
    ]
    coll = db.sample_coll(dataset)
    return {d["_id"]: d["v"] for d in coll.aggregate(pipeline, allowDiskUse=True)}


def _ensure_geo_field(dataset, field):
    if not _check_geo_field(dataset, field):
        dataset.add_sample_field(
            field, fof.EmbeddedDocumentField, embedded_doc_type=fol.GeoLocation
        )


def _check_geo_field(dataset, field):
    if not isinstance(field, str) or not field.strip():
        raise BulkLabelingError("The location field name cannot be empty")
    if field in _RESERVED_FIELDS or field.startswith("_") or "." in field:
        raise BulkLabelingError(
            "'%s' is reserved; choose another field for locations" % field
        )

    schema = dataset.get_field_schema()
    if field not in schema:
        return False

    ftype = schema[field]
    if not (
        isinstance(ftype, fof.EmbeddedDocumentField)
        and issubclass(ftype.document_type, fol.GeoLocation)
    ):
        raise BulkLabelingError(
            "Field '%s' exists but is a %s, not a GeoLocation field"
            % (field, _describe_field(ftype))
        )

    return True


# --------------------------------------------------------------------------
# Server-side expressions
# --------------------------------------------------------------------------


def _is_object(expr):
    return {"$eq": [{"$type": expr}, "object"]}


def _object_or_empty(expr):
    return {"$cond": [_is_object(expr), expr, {"$literal": {}}]}


def _merge_expr(path, payload):
    """The deep merge of ``payload`` into the value at ``path`` (a ``$``
    field path): objects merge, anything else is replaced. Key order is
    kept, new keys are appended in sorted order, as :func:`deep_merge` and
    the update operators of :func:`_merge_plan` do."""
    values = {}
    for key, value in sorted(payload.items()):
        if isinstance(value, dict):
            values[key] = _merge_expr("%s.%s" % (path, key), value)
        else:
            values[key] = {"$literal": value}

    return {"$mergeObjects": [_object_or_empty(path), values]}


def _remove_expr(path, spec):
    """The object at ``path`` (known to be an object) without the keys of a
    remove spec; nested keys go, their parents stay."""
    drop = [k for k, v in spec.items() if v is True]
    nested = {k: v for k, v in spec.items() if isinstance(v, dict)}

    expr = path
    if drop:
        expr = {
            "$arrayToObject": {
                "$filter": {
                    "input": {"$objectToArray": path},
                    "cond": {"$not": [{"$in": ["$$this.k", {"$literal": drop}]}]},
                }
            }
        }

    if nested:
        children = {}
        for key, sub in nested.items():
            child = "%s.%s" % (path, key)
            children[key] = {
                "$cond": [_is_object(child), _remove_expr(child, sub), child]
            }
        expr = {"$mergeObjects": [expr, children]}

    return expr


def _new_value_expr(mode, field, payload):
    """The expression of a sample's new document, used by the write and by
    the capture of what it writes."""
    path = "$" + field
    if mode == "merge":
        return _merge_expr(path, payload)
    if mode == "overwrite":
        return {"$literal": payload}
    return {"$cond": [_is_object(path), _remove_expr(path, payload), path]}


#: A merge with more leaves than this uses the pipeline update only
_MAX_PLAN_LEAVES = 1000


def _merge_plan(field, payload):
    """The update-operator form of a merge, or None if it needs the pipeline.

    Most merges are a ``$set`` of dotted paths (``custom_metadata.site.row``),
    which MongoDB applies in place, much faster than a pipeline update. That
    is exact on every sample whose objects on the way are objects or absent
    ("safe" samples); the others (a ``null`` document, a string where the
    payload has an object, ...) get the pipeline update. Empty objects in
    the payload (which must exist after the merge) and numeric key names
    (which MongoDB orders numerically) also need the pipeline.

    Returns:
        ``{"set": {path: value}, "safe": query, "changed": query,
        "unsafe_expr": expression}``, or None
    """
    leaves = []
    prefixes = [field]

    def walk(obj, path):
        for key, value in obj.items():
            if key.isdigit():
                return False
            child = "%s.%s" % (path, key)
            if isinstance(value, dict):
                if not value:
                    return False
                prefixes.append(child)
                if not walk(value, child):
                    return False
            else:
                leaves.append((child, value))
        return True

    if not walk(payload, field) or len(leaves) > _MAX_PLAN_LEAVES:
        return None

    safe = {
        "$and": [
            {
                "$or": [
                    {p: {"$exists": False}},
                    {"$and": [{p: {"$type": "object"}}, {p: {"$not": {"$type": "array"}}}]},
                ]
            }
            for p in prefixes
        ]
    }
    changed = []
    for path, value in leaves:
        if value is None:
            changed += [{path: {"$exists": False}}, {path: {"$ne": None}}]
        elif isinstance(value, (list, tuple)):
            changed += [
                {path: {"$ne": value}},
                {path: {"$elemMatch": {"$eq": value}}},
            ]
            continue
        else:
            changed.append({path: {"$ne": value}})
        changed.append({path: {"$type": "array"}})

    unsafe_expr = {
        "$or": [
            {"$not": [{"$in": [{"$type": "$" + p}, ["object", "missing"]]}]}
            for p in prefixes
        ]
    }
    return {
        "set": dict(leaves),
        "safe": safe,
        "changed": {"$or": changed},
        "unsafe_expr": unsafe_expr,
    }


def _pick(expr, keys):
    """The entries of the object ``expr`` whose keys are in ``keys``."""
    return {
        "$arrayToObject": {
            "$filter": {
                "input": {"$objectToArray": expr},
                "cond": {"$in": ["$$this.k", {"$literal": keys}]},
            }
        }
    }


def _whole(expr):
    """``{"": value}``: a capture of a whole field (``{}`` if missing)."""
    return {"$setField": {"field": "", "input": {"$literal": {}}, "value": expr}}


def _changes(new_value, field):
    """Whether a sample changes: its new document differs from its current
    one. Exact for every change except a number written over an equal
    number of another BSON type (``1`` over ``1.0``), which is left alone."""
    return {"$ne": [new_value, "$" + field]}


def _hint(coll, ids):
    return db.scan_hint(coll, ids)


# --------------------------------------------------------------------------
# edit_metadata
# --------------------------------------------------------------------------


def _inverse(mode, field, payload):
    """The journal's inverse steps (``restore_values``) of an edit.

    merge: step 0 restores the payload's top-level keys on samples whose
    document was an object holding any of them (captured: prior and after
    values per key); samples that held none of them are not captured, and
    undo removes the keys where they still hold what the merge wrote
    (``after_if_missing``). Step 1 then restores samples whose document was
    not an object: a ``{}`` or a ``null`` is captured; a sample that had no
    document is left with ``{}`` by step 0, which step 1 removes.

    overwrite: the whole document of every sample that held one is
    captured; samples that had none get the payload, removed by undo.

    remove: the removed top-level keys of every sample that changes are
    captured.
    """
    if mode == "merge":
        keys = list(payload)
        return [
            {
                "kind": "restore_values",
                "field": field,
                "keys": keys,
                "after_if_missing": deep_merge({}, payload),
            },
            {
                "kind": "restore_values",
                "field": field,
                "keys": None,
                "after_if_missing": {"": {}},
            },
        ]

    if mode == "overwrite":
        return [
            {
                "kind": "restore_values",
                "field": field,
                "keys": None,
                "after_if_missing": {"": payload},
            }
        ]

    return [
        {
            "kind": "restore_values",
            "field": field,
            "keys": _top_keys(payload),
            "after_if_missing": None,
        }
    ]


def _top_keys(payload):
    return list(payload)


def _holds_a_key(field, keys):
    path = "$" + field
    return {
        "$and": [
            _is_object(path),
            {"$gt": [{"$size": {"$objectToArray": _pick(path, keys)}}, 0]},
        ]
    }


def _not_an_object(field):
    """A document that is there but is not an object, or is ``{}``."""
    path = "$" + field
    return {
        "$or": [
            {"$not": [{"$in": [{"$type": path}, ["object", "missing"]]}]},
            {"$eq": [path, {"$literal": {}}]},
        ]
    }


def _capture_keys(ids, field, keys, new_value, match):
    """Captures ``prior`` and ``after`` values of top-level keys."""
    path = "$" + field
    return [
        {"$match": ids.query(match)},
        {
            "$project": {
                "prior": _pick(path, keys),
                "after": _pick(new_value, keys),
            }
        },
    ]


def _capture_merged_keys(ids, field, payload):
    """The capture of a merge's top-level keys, on the samples whose document
    is an object holding any of them.

    The keys' values after the merge are the very expressions of the
    merge's ``$mergeObjects`` (see :func:`_merge_expr`); a key absent before
    is absent from ``prior``.
    """
    keys = list(payload)
    prior = {k: "$%s.%s" % (field, k) for k in keys}
    after = {
        k: _merge_expr("$%s.%s" % (field, k), v) if isinstance(v, dict)
        else {"$literal": v}
        for k, v in payload.items()
    }
    if len(keys) <= 64:
        holds = {"$or": [{"%s.%s" % (field, k): {"$exists": True}} for k in keys]}
        match = {
            "$and": [
                {field: {"$type": "object"}},
                {field: {"$not": {"$type": "array"}}},
                holds,
            ]
        }
    else:
        match = {"$expr": _holds_a_key(field, keys)}

    return [
        {"$match": ids.query(match)},
        {"$project": {"prior": prior, "after": after}},
    ]


def _capture_whole(ids, field, after, match):
    """Captures ``prior`` and ``after`` values of the whole field."""
    return [
        {"$match": ids.query(match)},
        {
            "$project": {
                "prior": _whole("$" + field),
                "after": _whole(after),
            }
        },
    ]


def _probe_merge(coll, field, payload, plan, ids, hint):
    """One scan of a batch that tells which captures and which update
    passes a merge needs."""
    kwargs = {"hint": {"$natural": 1}} if hint else {}
    none = {"holders": 0, "not_object": 0, "unsafe": 0}
    # Samples that have no document at all need neither (a cheap check)
    if coll.find_one(
        ids.query({field: {"$exists": True}}), {"_id": 1}, **kwargs
    ) is None:
        return none

    unsafe = plan["unsafe_expr"] if plan is not None else False
    pipeline = [
        {"$match": ids.query()},
        {
            "$group": {
                "_id": None,
                "holders": {"$sum": {"$cond": [_holds_a_key(field, list(payload)), 1, 0]}},
                "not_object": {"$sum": {"$cond": [_not_an_object(field), 1, 0]}},
                "unsafe": {"$sum": {"$cond": [unsafe, 1, 0]}},
            }
        },
    ]
    for doc in coll.aggregate(pipeline, **kwargs):
        return doc
    return none


def _iter_current_documents(sample_collection, field):
    """Streams ``(label, current document)`` of the targeted samples,
    reading only the field (and the filepath, for messages) from the raw
    sample collection."""
    coll = db.sample_coll(sample_collection)
    for ids in db.iter_id_batches(sample_collection):
        cursor = coll.find(
            ids.query(), {field: 1, "filepath": 1},
            batch_size=10000,
        )
        for doc in cursor:
            yield _sample_label(doc), doc.get(field)


def _sample_label(doc):
    return "sample %s (%s)" % (doc["_id"], doc.get("filepath"))


def _iter_validate_targets(sample_collection, field, payload, mode, schema,
                           matched):
    """Validates every targeted sample's resulting document against the
    schema. A generator of :class:`Progress`."""
    state = {"done": 0}

    def documents():
        for label, current in _iter_current_documents(sample_collection, field):
            state["done"] += 1
            yield label, apply_edit(current, payload, mode)

    # validate_documents consumes the stream; progress is reported per batch
    yield Progress(0, matched, "Validating")
    validate_documents(sample_collection._dataset, field, documents(),
                       schema=schema)
    yield Progress(state["done"], matched, "Validating")


def iter_edit_metadata(sample_collection, metadata, mode="merge",
                       field=DEFAULT_FIELD, dry_run=False, user=None,
                       target=None):
    """Edits the metadata of every sample of a collection.

    A generator of :class:`bulk_labeling.core.progress.Progress` events; use
    :func:`edit_metadata` for a plain call.

    Returns:
        ``{"operation_id", "matched", "changed"}``, plus ``"dry_run": True``
        for a dry run
    """
    db.require_sample_view(sample_collection)
    dataset = sample_collection._dataset
    mode = parse_mode(mode)
    check_metadata_field(dataset, field)
    payload = parse_payload(metadata, mode)

    matched = sample_collection.count()
    if matched == 0:
        raise BulkLabelingError("No samples are targeted")

    schema = get_metadata_schema(dataset, field)
    if schema is not None:
        yield from _iter_validate_targets(
            sample_collection, field, payload, mode, schema, matched
        )

    new_value = _new_value_expr(mode, field, payload)
    if dry_run:
        coll = db.sample_coll(dataset)
        changed = 0
        for ids in db.iter_id_batches(sample_collection, matched):
            hint = _hint(coll, ids)
            changed += coll.count_documents(
                ids.query({"$expr": _changes(new_value, field)}),
                **({"hint": hint} if hint else {})
            )

        return {"operation_id": None, "matched": matched, "changed": changed,
                "dry_run": True}

    ensure_metadata_field(
        dataset, field, [payload] if mode != "remove" else None
    )

    params = {"mode": mode, "field": field, "metadata": payload}
    op = yield from history.run_operation(
        dataset,
        OPERATION_TYPE,
        params,
        _inverse(mode, field, payload),
        db.iter_id_batches(sample_collection, matched),
        _write_edit,
        target=target or {"kind": "view", "size": matched},
        user=user,
    )
    return {
        "operation_id": op.operation_id,
        "matched": op.record["matched"],
        "changed": op.record["changed"],
    }


def edit_metadata(sample_collection, metadata, mode="merge",
                  field=DEFAULT_FIELD, dry_run=False, progress=None):
    """Edits the custom metadata of every sample of a dataset or view.

    Modes:

    -   ``"merge"`` (default): objects deep-merge; scalars and arrays are
        replaced
    -   ``"overwrite"``: the whole document is replaced by ``metadata``
    -   ``"remove"``: ``metadata`` is an object whose leaves are ``true``,
        e.g. ``{"camera": True, "site": {"row": True}}``; those keys are
        deleted, their parents stay

    Everything is validated before anything is written (see
    :func:`parse_metadata` and :func:`set_metadata_schema`). Each mode is one
    bulk pipeline update per 100k samples, atomic per sample, journaled:
    ``bulk_labeling.undo(dataset, result["operation_id"])`` restores the
    exact prior documents.

    Example::

        import bulk_labeling as bl
        from fiftyone import ViewField as F

        bl.edit_metadata(dataset.select(ids), {"camera": "A7", "site": {"row": 3}})
        bl.edit_metadata(dataset, {"site": {"row": True}}, mode="remove")
        dataset.match(F("custom_metadata.camera") == "A7")

    Args:
        sample_collection: a :class:`fiftyone.core.collections.SampleCollection`
        metadata: a JSON object, as a dict or JSON text
        mode ("merge"): ``"merge"``, ``"overwrite"`` or ``"remove"``
        field ("custom_metadata"): the metadata field
        dry_run (False): validate and count what would change, write nothing
        progress (None): whether to render a progress bar, or a callback

    Returns:
        ``{"operation_id", "matched", "changed"}``
    """
    from .progress import run

    return run(
        iter_edit_metadata(sample_collection, metadata, mode=mode,
                           field=field, dry_run=dry_run),
        progress=progress,
    )


def _write_edit(dataset, op):
    params = op.params
    mode, field, payload = params["mode"], params["field"], params["metadata"]
    new_value = _new_value_expr(mode, field, payload)
    changes = _changes(new_value, field)
    pipeline_update = [{"$set": {field: new_value, "last_modified_at": "$$NOW"}}]
    plan = _merge_plan(field, payload) if mode == "merge" else None
    coll = db.sample_coll(dataset)

    def write_batch(seq, ids):
        hint = _hint(coll, ids)
        passes = []
        # Capture what the write will destroy, before writing
        if mode == "merge":
            probe = _probe_merge(coll, field, payload, plan, ids, hint)
            if probe["holders"]:
                op.capture(ids, _capture_merged_keys(ids, field, payload), 0, seq)
            if probe["not_object"]:
                op.capture(
                    ids,
                    _capture_whole(ids, field, {"$literal": {}},
                                   {"$expr": _not_an_object(field)}),
                    1,
                    seq,
                )
            if plan is None:
                passes.append((ids.query({"$expr": changes}), pipeline_update))
            else:
                # Samples whose objects on the way are not all objects get
                # the pipeline; the others the (much faster) $set of paths
                if probe["unsafe"]:
                    passes.append((
                        ids.query({"$nor": [plan["safe"]], "$expr": changes}),
                        pipeline_update,
                    ))
                passes.append((
                    ids.query({"$and": [plan["safe"], plan["changed"]]}),
                    {"$set": dict(plan["set"], last_modified_at=db.utcnow())},
                ))
        elif mode == "overwrite":
            op.capture(
                ids,
                _capture_whole(ids, field, new_value, {field: {"$exists": True}}),
                0,
                seq,
            )
            passes.append((
                ids.query({"$or": [{field: {"$ne": payload}},
                                   {field: {"$type": "array"}}]}),
                {"$set": {field: payload, "last_modified_at": db.utcnow()}},
            ))
        else:
            op.capture(
                ids,
                _capture_keys(ids, field, _top_keys(payload), new_value,
                              {"$expr": changes}),
                0,
                seq,
            )
            passes.append((ids.query({"$expr": changes}), pipeline_update))

        changed = 0
        for query, update in passes:
            changed += coll.update_many(query, update, hint=hint).modified_count
        return len(ids), changed

    yield from op.run_batches(write_batch, "Editing metadata")


def preview_edit(sample_collection, metadata, mode="merge",
                 field=DEFAULT_FIELD):
    """Previews an edit for the App: validates the payload, counts the
    samples that would change, and shows one sample's resulting document.

    Unlike a dry run, only the previewed sample is checked against the
    schema, so that the preview stays fast on large views.

    Returns:
        ``{"matched", "changed", "sample_id", "filepath", "before",
        "after", "schema_errors"}``
    """
    db.require_sample_view(sample_collection)
    dataset = sample_collection._dataset
    mode = parse_mode(mode)
    check_metadata_field(dataset, field)
    payload = parse_payload(metadata, mode)

    coll = db.sample_coll(dataset)
    new_value = _new_value_expr(mode, field, payload)
    matched = 0
    changed = 0
    first = None
    for ids in db.iter_id_batches(sample_collection):
        if first is None:
            first = ids.ids[0]
        matched += len(ids)
        changed += coll.count_documents(
            ids.query({"$expr": _changes(new_value, field)})
        )

    result = {
        "matched": matched,
        "changed": changed,
        "sample_id": None,
        "filepath": None,
        "before": None,
        "after": None,
        "schema_errors": [],
    }
    if first is None:
        return result

    doc = coll.find_one({"_id": first}, {field: 1, "filepath": 1}) or {}
    before = doc.get(field)
    after = apply_edit(before, payload, mode)
    result.update(
        sample_id=str(first),
        filepath=doc.get("filepath"),
        before=user_document(before),
        after=user_document(after),
    )
    schema = get_metadata_schema(dataset, field)
    if schema is not None and after is not None:
        result["schema_errors"] = schema_errors(
            schema_validator(schema), user_document(after)
        )

    return result


# --------------------------------------------------------------------------
# set_geolocation
# --------------------------------------------------------------------------


def parse_coordinate(value, name, low, high):
    """Checks one coordinate: a finite number in ``[low, high]``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BulkLabelingError("%s is required" % name.capitalize())
    if isinstance(value, bool):
        raise BulkLabelingError("%s must be a number, not a boolean" % name.capitalize())
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise BulkLabelingError(
                "%s must be a number, not %r" % (name.capitalize(), value)
            )
    if not isinstance(value, numbers.Real):
        raise BulkLabelingError(
            "%s must be a number, not %s" % (name.capitalize(), type(value).__name__)
        )

    value = float(value)
    if not math.isfinite(value):
        raise BulkLabelingError("%s must be a finite number" % name.capitalize())
    if not low <= value <= high:
        raise BulkLabelingError(
            "%s must be between %g and %g; got %r" % (name.capitalize(), low, high, value)
        )

    return value


def parse_coordinates(latitude, longitude):
    """Returns ``(latitude, longitude)`` as floats, or raises a clear error
    if either is missing, not a number or out of range."""
    return (
        parse_coordinate(latitude, "latitude", -90.0, 90.0),
        parse_coordinate(longitude, "longitude", -180.0, 180.0),
    )


def _geo_value_expr(params):
    field = params["field"]
    path = "$" + field
    if params["mode"] == "remove":
        return "$$REMOVE"

    point = {
        "type": "Point",
        "coordinates": [params["longitude"], params["latitude"]],
    }
    is_geo = {
        "$and": [_is_object(path), {"$eq": [path + "._cls", "GeoLocation"]}]
    }
    new_doc = {
        "_id": db.generated_id_expr(params["prefix"]),
        "_cls": {"$literal": "GeoLocation"},
        "tags": {"$literal": []},
        "point": {"$literal": point},
    }
    # An existing GeoLocation keeps its id, tags, line and polygon
    return {
        "$cond": [
            is_geo,
            {"$mergeObjects": [path, {"point": {"$literal": point}}]},
            new_doc,
        ]
    }


def _geo_changes(params):
    field = params["field"]
    if params["mode"] == "remove":
        return {"$ne": [{"$type": "$" + field}, "missing"]}
    return _changes(_geo_value_expr(params), field)


def iter_set_geolocation(sample_collection, latitude=None, longitude=None,
                         mode="set", field=DEFAULT_GEO_FIELD, dry_run=False,
                         user=None, target=None):
    """Sets (or removes) a GeoLocation point on every sample of a collection.

    A generator of :class:`Progress`; see :func:`set_geolocation`.
    """
    db.require_sample_view(sample_collection)
    dataset = sample_collection._dataset
    mode = mode or "set"
    if mode not in ("set", "remove"):
        raise BulkLabelingError("mode must be 'set' or 'remove', not %r" % (mode,))

    _check_geo_field(dataset, field)
    params = {"mode": mode, "field": field}
    if mode == "set":
        lat, lon = parse_coordinates(latitude, longitude)
        params.update(latitude=lat, longitude=lon, prefix="00000000")

    matched = sample_collection.count()
    if matched == 0:
        raise BulkLabelingError("No samples are targeted")

    if dry_run:
        coll = db.sample_coll(dataset)
        changes = _geo_changes(params)
        changed = 0
        for ids in db.iter_id_batches(sample_collection, matched):
            changed += coll.count_documents(ids.query({"$expr": changes}))

        return {"operation_id": None, "matched": matched, "changed": changed,
                "dry_run": True}

    if mode == "set":
        _ensure_geo_field(dataset, field)
        params["prefix"] = db.allocate_id_prefixes(dataset, 1)[0]

    inverse = [
        {
            "kind": "restore_values",
            "field": field,
            "keys": None,
            "after_if_missing": None,
        }
    ]
    op = yield from history.run_operation(
        dataset,
        GEO_OPERATION_TYPE,
        params,
        inverse,
        db.iter_id_batches(sample_collection, matched),
        _write_geo,
        target=target or {"kind": "view", "size": matched},
        user=user,
    )
    return {
        "operation_id": op.operation_id,
        "matched": op.record["matched"],
        "changed": op.record["changed"],
    }


def set_geolocation(sample_collection, latitude=None, longitude=None,
                    mode="set", field=DEFAULT_GEO_FIELD, dry_run=False,
                    progress=None):
    """Sets a location on every sample of a dataset or view, or removes it.

    The location is a :class:`fiftyone.core.labels.GeoLocation` whose
    ``point`` is ``[longitude, latitude]``, in a field declared as
    ``EmbeddedDocumentField(fo.GeoLocation)``, so FiftyOne's Map panel,
    ``geo_near`` and ``geo_within`` use it. A sample that already has a
    GeoLocation keeps its label id, tags, line and polygon; only the point
    changes. Journaled: ``bulk_labeling.undo`` restores the prior values.

    Example::

        import bulk_labeling as bl

        bl.set_geolocation(dataset.select(ids), latitude=48.8584, longitude=2.2945)
        bl.set_geolocation(dataset.match_tags("bad-gps"), mode="remove")

    Args:
        sample_collection: a :class:`fiftyone.core.collections.SampleCollection`
        latitude (None): a number in ``[-90, 90]`` (required to set)
        longitude (None): a number in ``[-180, 180]`` (required to set)
        mode ("set"): ``"set"`` or ``"remove"``
        field ("location"): the GeoLocation field
        dry_run (False): count what would change, write nothing
        progress (None): whether to render a progress bar, or a callback

    Returns:
        ``{"operation_id", "matched", "changed"}``
    """
    from .progress import run

    return run(
        iter_set_geolocation(sample_collection, latitude=latitude,
                             longitude=longitude, mode=mode, field=field,
                             dry_run=dry_run),
        progress=progress,
    )


def _write_geo(dataset, op):
    params = op.params
    field = params["field"]
    new_value = _geo_value_expr(params)
    changes = _geo_changes(params)
    if params["mode"] == "remove":
        update = [{"$unset": field}, {"$set": {"last_modified_at": "$$NOW"}}]
    else:
        update = [{"$set": {field: new_value, "last_modified_at": "$$NOW"}}]

    coll = db.sample_coll(dataset)

    def write_batch(seq, ids):
        op.capture(
            ids,
            [
                {"$match": ids.query({"$expr": changes})},
                {
                    "$project": {
                        "prior": _whole("$" + field),
                        "after": _whole(new_value),
                    }
                },
            ],
            0,
            seq,
        )
        res = coll.update_many(
            ids.query({"$expr": changes}), update,
            hint=_hint(coll, ids),
        )
        return len(ids), res.modified_count

    yield from op.run_batches(write_batch, "Setting locations")


history.register_writer(OPERATION_TYPE, _write_edit)
history.register_writer(GEO_OPERATION_TYPE, _write_geo)
