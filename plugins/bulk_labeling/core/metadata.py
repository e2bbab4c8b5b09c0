"""Bulk metadata: validated JSON objects on many samples at once.

The user's JSON lives in a field of its own (``custom_metadata`` by default);
FiftyOne's ``metadata`` field is reserved for media metadata.

This module's validation is shared by every path that writes metadata:
:func:`parse_metadata` checks a payload, and a per-dataset JSON Schema (see
:func:`set_metadata_schema`) checks each resulting sample document.
"""

import json

import jsonschema

from .errors import BulkLabelingError

DEFAULT_FIELD = "custom_metadata"

#: The largest payload accepted, in bytes of its JSON encoding
MAX_PAYLOAD_BYTES = 1024 * 1024

#: The deepest nesting accepted (the top-level object is depth 1). MongoDB
#: allows 100 levels per document; this leaves room for the sample itself
MAX_DEPTH = 20

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


def parse_metadata(payload, allow_empty=True):
    """Parses and validates a metadata payload.

    Rules: it must parse as JSON (when given as text) and be a JSON object;
    keys are non-empty strings with no leading ``$`` and no ``.``, so that
    no MongoDB operator or path can be smuggled in; the encoded payload is at
    most :data:`MAX_PAYLOAD_BYTES`, nested at most :data:`MAX_DEPTH` deep;
    numbers are finite.

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
        payload = payload.decode("utf-8", errors="strict")

    if isinstance(payload, str):
        if len(payload.encode("utf-8")) > MAX_PAYLOAD_BYTES:
            raise BulkLabelingError(
                "Metadata is larger than %d bytes" % MAX_PAYLOAD_BYTES
            )
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as e:
            raise BulkLabelingError("Metadata is not valid JSON: %s" % e)

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
    elif isinstance(value, list):
        for index, child in enumerate(value):
            _check_value(child, "%s[%d]" % (path, index), depth + 1)
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise BulkLabelingError(
                "Metadata value at '%s' is not a finite number" % path
            )
    elif value is not None and not isinstance(value, (str, int, bool)):
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


def _join(path, key):
    return key if not path else "%s.%s" % (path, key)


def _json_type(value):
    if isinstance(value, list):
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


def validate_field_name(field):
    """Checks that ``field`` can hold user metadata."""
    if not isinstance(field, str) or not field.strip():
        raise BulkLabelingError("The metadata field name cannot be empty")
    if field in _RESERVED_FIELDS or field.startswith("_") or "." in field:
        raise BulkLabelingError(
            "'%s' is reserved; choose another field for custom metadata"
            % field
        )
    return field


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


def deep_merge(base, payload):
    """Merges ``payload`` into ``base``: objects deep-merge; scalars and
    arrays are replaced. Returns a new dict; neither input is modified.

    This is the Python twin of the server-side merge, used to validate the
    resulting documents against a schema before anything is written.
    """
    if not isinstance(base, dict):
        base = {}

    merged = dict(base)
    for key, value in payload.items():
        if isinstance(value, dict):
            merged[key] = deep_merge(merged.get(key), value)
        else:
            merged[key] = value

    return merged
