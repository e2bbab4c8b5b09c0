"""Bulk metadata: validation rules, the modes' exact results, schemas,
filtering, geolocation, the operators, undo round trips and concurrency.

Everything runs against a real mongod (see ``conftest.py``). "Nothing
written" is checked by comparing the raw stored documents before and after.
"""

import asyncio
import json
import multiprocessing

import pytest

import fiftyone as fo
import fiftyone.core.fields as fof
from fiftyone import ViewField as F
from fiftyone.operators.executor import resolve_type
from fiftyone.operators.registry import OperatorRegistry

import bulk_labeling as bl
from bulk_labeling.core import database as db
from bulk_labeling.core import history
from bulk_labeling.core import metadata as meta
from bulk_labeling.core.errors import BulkLabelingError

from conftest import make_samples, run_operator, uri

FIELD = meta.DEFAULT_FIELD


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def raw_docs(dataset):
    """Every stored sample document, as pymongo returns it."""
    return list(db.sample_coll(dataset).find({}, sort=[("_id", 1)]))


def field_values(dataset, field=FIELD):
    """``{sample_id: value}``, with a marker for an absent field, and dicts
    turned into lists of pairs so that key order is compared too."""
    return {
        d["_id"]: ordered(d[field]) if field in d else "<absent>"
        for d in db.sample_coll(dataset).find({}, {field: 1})
    }


def ordered(value, keep_order=True):
    """A comparable form of a value that tells ``True`` from ``1`` and ``1``
    from ``1.0``, and (unless ``keep_order=False``) compares key order."""
    if isinstance(value, dict):
        items = [(k, ordered(v, keep_order)) for k, v in value.items()]
        return ("{}", items if keep_order else sorted(items))
    if isinstance(value, list):
        return ("[]", [ordered(v, keep_order) for v in value])
    return (type(value).__name__, value)


def unordered(values):
    """``field_values`` without key order."""
    return {
        k: v if v == "<absent>" else _reorder(v) for k, v in values.items()
    }


def _reorder(tagged):
    kind, value = tagged
    if kind == "{}":
        return (kind, sorted((k, _reorder(v)) for k, v in value))
    if kind == "[]":
        return (kind, [_reorder(v) for v in value])
    return tagged


def seed(dataset, values):
    """Adds one sample per value; ``"<absent>"`` leaves the field out.

    Values are written raw, as any other writer could have left them."""
    ids = make_samples(dataset, len(values))
    coll = db.sample_coll(dataset)
    for sample_id, value in zip(ids, values):
        if value != "<absent>":
            coll.update_one({"_id": db_id(sample_id)}, {"$set": {FIELD: value}})
    return ids


def db_id(sample_id):
    from bson import ObjectId

    return ObjectId(sample_id)


def num_operations(dataset):
    return len(history.list_operations(dataset, limit=0))


PRIORS = [
    "<absent>",
    None,
    {},
    {"camera": "old", "site": {"row": 1, "col": 2}, "tags": [1, 2]},
    {"site": "a string"},
    {"site": [{"row": 1}]},
    {"other": True},
    {"camera": "A7", "site": {"row": 3}, "tags": ["x"]},
]

MERGE = {"camera": "A7", "site": {"row": 3}, "tags": ["x"]}


# --------------------------------------------------------------------------
# validation rules
# --------------------------------------------------------------------------


def _deep(depth):
    value = 1
    for _ in range(depth - 1):
        value = {"k": value}
    return value


BAD_PAYLOADS = [
    ("{not json", "not valid JSON"),
    ("", "No metadata"),
    ("[1, 2]", "must be a JSON object, not an array"),
    ('"text"', "not a string"),
    ("5", "not a number"),
    ("null", "not null"),
    ('{"$set": {"x": 1}}', "cannot start with '$'"),
    ('{"a": {"$where": 1}}', "cannot start with '$'"),
    ('{"a.b": 1}', "cannot contain '.'"),
    ('{"a": {"b.c": 1}}', "cannot contain '.'"),
    ('{"": 1}', "cannot be empty"),
    ('{"_cls": "Detection"}', "reserved"),
    ('{"a": NaN}', "not a finite number"),
    ('{"a": [1, Infinity]}', "not a finite number"),
    ('{"a": 1e999}', "not a finite number"),
    ({"a": float("nan")}, "not a finite number"),
    ({"a": float("-inf")}, "not a finite number"),
    ({1: "int key"}, "is not a string"),
    ({"a": {1, 2}}, "not a JSON value"),
    ({"a": 2 ** 64}, "64 bits"),
    ('{"a": "%s"}' % ("x" * (1024 * 1024)), "larger than"),
    ({"a": "x" * (1024 * 1024)}, "larger than"),
    (json.dumps(_deep(meta.MAX_DEPTH + 1)), "nested more than"),
    (_deep(meta.MAX_DEPTH + 1), "nested more than"),
    ({"a": [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]}, "nested more than"),
]


@pytest.mark.parametrize("payload,message", BAD_PAYLOADS)
def test_parse_metadata_rejects(payload, message):
    with pytest.raises(BulkLabelingError, match=_escape(message)):
        meta.parse_metadata(payload)


def _escape(message):
    import re

    return re.escape(message)


def test_parse_metadata_limits_are_inclusive():
    assert meta.parse_metadata(_deep(meta.MAX_DEPTH)) == _deep(meta.MAX_DEPTH)
    big = {"a": "x" * (meta.MAX_PAYLOAD_BYTES - 20)}
    assert meta.parse_metadata(json.dumps(big)) == big
    assert meta.parse_metadata(b'{"a": 1}') == {"a": 1}


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"camera": False}, "give it the value true"),
        ({"camera": 1}, "give it the value true"),
        ({"site": {}}, "Nothing to remove"),
        ({}, "empty object"),
        ({"site": {"row": "yes"}}, "'site.row' is a string"),
    ],
)
def test_remove_spec_rules(spec, message):
    with pytest.raises(BulkLabelingError, match=_escape(message)):
        meta.parse_remove_spec(spec)


def test_rejected_payloads_write_nothing(dataset):
    seed(dataset, PRIORS)
    before = raw_docs(dataset)
    ops = num_operations(dataset)
    bad = [p for p, _ in BAD_PAYLOADS if not (isinstance(p, str) and len(p) > 1000)]
    for payload in bad:
        for mode in meta.MODES:
            with pytest.raises(BulkLabelingError):
                bl.edit_metadata(dataset, payload, mode=mode)
            with pytest.raises(BulkLabelingError):
                bl.edit_metadata(dataset, payload, mode=mode, dry_run=True)

    # merge/remove of nothing, bad modes and reserved fields
    for args, kwargs in [
        (({},), {}),
        (({},), {"mode": "remove"}),
        (({"a": 1},), {"mode": "replace"}),
        (({"a": 1},), {"field": "metadata"}),
        (({"a": 1},), {"field": "filepath"}),
        (({"a": 1},), {"field": "a.b"}),
        (({"a": 1},), {"field": ""}),
    ]:
        with pytest.raises(BulkLabelingError):
            bl.edit_metadata(dataset, *args, **kwargs)

    # a field of another type
    dataset.add_sample_field("score", fo.FloatField)
    with pytest.raises(BulkLabelingError, match="not a custom metadata field"):
        bl.edit_metadata(dataset, {"a": 1}, field="score")

    assert raw_docs(dataset) == before
    assert num_operations(dataset) == ops
    assert FIELD not in dataset.get_field_schema()


def test_empty_view_is_an_error(dataset):
    make_samples(dataset, 2)
    with pytest.raises(BulkLabelingError, match="No samples"):
        bl.edit_metadata(dataset.limit(0), {"a": 1})


# --------------------------------------------------------------------------
# modes: exact results
# --------------------------------------------------------------------------


def _expected(prior, payload, mode):
    current = None if prior == "<absent>" else prior
    result = meta.apply_edit(current, payload, mode)
    if result is None and prior == "<absent>":
        return "<absent>"
    return ordered(result)


@pytest.mark.parametrize(
    "mode,payload",
    [
        # update operators on "safe" samples, a pipeline on the others
        ("merge", MERGE),
        ("merge", {"n": None, "flag": True, "list": [], "site": {"row": 1.0}}),
        # only the pipeline: an empty object, numeric key names
        ("merge", dict(MERGE, extra={})),
        ("merge", {"10": 1, "9": {"a": 2}, "camera": "A7"}),
        ("overwrite", {"camera": "B", "list": [{"a": 1}], "n": None}),
        ("remove", {"camera": True, "site": {"row": True}, "tags": True}),
    ],
)
def test_modes_exact_results(dataset, mode, payload):
    ids = seed(dataset, PRIORS)
    before = {d["_id"]: d for d in raw_docs(dataset)}

    result = bl.edit_metadata(dataset, payload, mode=mode)

    after = {d["_id"]: d for d in raw_docs(dataset)}
    values = field_values(dataset)
    expected_changed = 0
    for sample_id, prior in zip(ids, PRIORS):
        _id = db_id(sample_id)
        expected = _expected(prior, payload, mode)
        assert values[_id] == expected, (prior, values[_id])
        did_change = expected != (ordered(prior) if prior != "<absent>" else prior)
        expected_changed += did_change
        # last_modified_at moves exactly on the samples that change
        moved = after[_id]["last_modified_at"] != before[_id]["last_modified_at"]
        assert moved == did_change, prior
        # nothing else in the sample changes
        assert {k: v for k, v in after[_id].items() if k not in (FIELD, "last_modified_at")} == {
            k: v for k, v in before[_id].items() if k not in (FIELD, "last_modified_at")
        }

    assert result["matched"] == len(PRIORS)
    assert result["changed"] == expected_changed
    assert result["operation_id"]


def test_merge_semantics_spelled_out(dataset):
    ids = seed(
        dataset,
        [
            {"camera": "old", "site": {"row": 1, "col": 2}, "tags": [1, 2], "keep": 1},
            {"site": [{"row": 1}]},
            "<absent>",
        ],
    )
    bl.edit_metadata(dataset, '{"tags": ["x"], "camera": "A7", "site": {"row": 3}}')
    values = {str(k): v for k, v in field_values(dataset).items()}
    # objects deep-merge, key order kept, new keys appended in sorted order
    assert values[ids[0]] == ordered(
        {"camera": "A7", "site": {"row": 3, "col": 2}, "tags": ["x"], "keep": 1}
    )
    # an array is replaced, not merged into
    assert values[ids[1]] == ordered({"site": {"row": 3}, "camera": "A7", "tags": ["x"]})
    assert values[ids[2]] == ordered({"camera": "A7", "site": {"row": 3}, "tags": ["x"]})


def test_nested_remove_keeps_parents(dataset):
    ids = seed(
        dataset,
        [
            {"camera": "x", "site": {"row": 1, "col": 2}, "other": 1},
            {"site": {"row": 1}},
            {"site": "a string", "camera": "y"},
            {"site": [{"row": 1}]},
            "<absent>",
            {"unrelated": 1},
        ],
    )
    result = bl.edit_metadata(
        dataset, {"camera": True, "site": {"row": True}}, mode="remove"
    )
    values = {str(k): v for k, v in field_values(dataset).items()}
    assert values[ids[0]] == ordered({"site": {"col": 2}, "other": 1})
    assert values[ids[1]] == ordered({"site": {}})
    assert values[ids[2]] == ordered({"site": "a string"})
    assert values[ids[3]] == ordered({"site": [{"row": 1}]})
    assert values[ids[4]] == "<absent>"
    assert values[ids[5]] == ordered({"unrelated": 1})
    assert result == {"operation_id": result["operation_id"], "matched": 6, "changed": 3}


def test_targets_like_label_as(dataset):
    ids = make_samples(dataset, 6)
    result = bl.edit_metadata(dataset.select(ids[:2]), {"a": 1})
    assert result["matched"] == 2 and result["changed"] == 2
    assert len(dataset.exists(FIELD)) == 2
    # views whose stages hide the field still act on the stored documents
    result = bl.edit_metadata(
        dataset.select_fields().match(F("filepath").ends_with("0.jpg")),
        {"b": 2},
    )
    assert result["changed"] == 1
    first = dataset[dataset.values("filepath")[0]]
    assert meta.user_document(first[FIELD].to_dict()) == {"a": 1, "b": 2}


def test_multiple_batches(dataset, monkeypatch):
    monkeypatch.setattr(db, "ID_BATCH_SIZE", 3)
    ids = seed(dataset, PRIORS)
    snapshot = field_values(dataset)
    result = bl.edit_metadata(dataset, MERGE)
    assert result["matched"] == len(ids)
    assert result["changed"] == len(ids) - 1
    for sample_id, prior in zip(ids, PRIORS):
        assert field_values(dataset)[db_id(sample_id)] == _expected(prior, MERGE, "merge")
    bl.undo(dataset, result["operation_id"])
    assert field_values(dataset) == snapshot


def test_dry_run_writes_nothing(dataset):
    seed(dataset, PRIORS)
    before = raw_docs(dataset)
    ops = num_operations(dataset)
    for mode, payload in [("merge", MERGE), ("overwrite", {"a": 1}),
                          ("remove", {"camera": True})]:
        result = bl.edit_metadata(dataset, payload, mode=mode, dry_run=True)
        assert result["dry_run"] is True and result["operation_id"] is None
        real = {"merge": 7, "overwrite": 8, "remove": 2}[mode]
        assert result["changed"] == real

    result = bl.set_geolocation(dataset, 10, 20, dry_run=True)
    assert result["changed"] == len(PRIORS)
    assert raw_docs(dataset) == before
    assert num_operations(dataset) == ops
    assert FIELD not in dataset.get_field_schema()
    assert "location" not in dataset.get_field_schema()


# --------------------------------------------------------------------------
# filtering: sidebar declarations and Python views
# --------------------------------------------------------------------------


def test_top_level_keys_are_declared_and_filterable(dataset):
    ids = make_samples(dataset, 5)
    bl.edit_metadata(dataset.select(ids[:2]), {"camera": "A7", "iso": 100,
                                                "exposure": 0.5, "flash": False,
                                                "lens": {"mm": 35},
                                                "tags": ["a", "b"]})
    bl.edit_metadata(dataset.select(ids[2:4]), {"camera": "X100", "iso": 200})

    schema = dataset.get_field_schema(flat=True)
    field = schema[FIELD]
    assert isinstance(field, fof.EmbeddedDocumentField)
    assert field.document_type is fo.DynamicEmbeddedDocument
    assert isinstance(schema[FIELD + ".camera"], fof.StringField)
    assert isinstance(schema[FIELD + ".iso"], fof.IntField)
    assert isinstance(schema[FIELD + ".exposure"], fof.FloatField)
    assert isinstance(schema[FIELD + ".flash"], fof.BooleanField)
    assert isinstance(schema[FIELD + ".lens"], fof.DictField)
    assert isinstance(schema[FIELD + ".tags"], fof.ListField)

    assert len(dataset.match(F(FIELD + ".camera") == "A7")) == 2
    assert len(dataset.match(F(FIELD + ".iso") > 150)) == 2
    assert dataset.count_values(FIELD + ".camera") == {"A7": 2, "X100": 2, None: 1}
    assert dataset.bounds(FIELD + ".iso") == (100, 200)
    # samples load through FiftyOne
    sample = dataset[dataset.match(F(FIELD + ".camera") == "A7").first().id]
    assert sample[FIELD].camera == "A7" and sample[FIELD].lens == {"mm": 35}

    # an int key that receives a float is widened
    bl.edit_metadata(dataset.select(ids[4:]), {"iso": 150.5})
    assert isinstance(dataset.get_field(FIELD + ".iso"), fof.FloatField)
    assert dataset.bounds(FIELD + ".iso") == (100, 200)


# --------------------------------------------------------------------------
# JSON Schema
# --------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "camera": {"type": "string"},
        "iso": {"type": "integer", "minimum": 50},
    },
    "required": ["camera"],
}


def test_invalid_schema_is_rejected_and_not_stored(dataset):
    make_samples(dataset, 2)
    for schema, message in [
        ('{"type": ', "not valid JSON"),
        ("[1]", "must be a JSON object"),
        ({"type": "nope"}, "Invalid JSON Schema"),
        ({"properties": {"a": {"minimum": "x"}}}, "Invalid JSON Schema"),
    ]:
        with pytest.raises(BulkLabelingError, match=_escape(message)):
            bl.set_metadata_schema(dataset, schema)
    assert bl.get_metadata_schema(dataset) is None


def test_schema_violations_are_counted_and_block_edits(dataset):
    ids = seed(
        dataset,
        [{"camera": "A7"}, {"camera": 5}, {"iso": 100}, "<absent>", {"camera": "B", "iso": 10}],
    )
    result = bl.set_metadata_schema(dataset, json.dumps(SCHEMA))
    assert result["schema"] == "set"
    assert result["checked"] == 4
    assert result["violations"] == 3
    named = {s["sample_id"] for s in result["violating_samples"]}
    assert named == {ids[1], ids[2], ids[4]}
    assert bl.get_metadata_schema(dataset) == SCHEMA
    assert "bulk_labeling" in fo.load_dataset(dataset.name).info

    before = raw_docs(dataset)
    ops = num_operations(dataset)
    # merged documents are validated: sample 2 would still lack a camera
    with pytest.raises(BulkLabelingError) as err:
        bl.edit_metadata(dataset, {"iso": 200})
    message = str(err.value)
    assert "nothing was written" in message
    assert ids[2] in message and ids[3] in message
    assert "'camera' is a required property" in message
    assert "5 is not of type 'string'" in message
    assert raw_docs(dataset) == before
    assert num_operations(dataset) == ops

    # a merge that makes every document valid goes through
    result = bl.edit_metadata(dataset, {"camera": "Z", "iso": 100})
    assert result["changed"] == 5
    # removing a required key is caught too
    with pytest.raises(BulkLabelingError, match="required property"):
        bl.edit_metadata(dataset.select(ids[0]), {"camera": True}, mode="remove")

    # clearing
    result = bl.set_metadata_schema(dataset, "")
    assert result["schema"] == "cleared"
    assert bl.get_metadata_schema(dataset) is None
    bl.edit_metadata(dataset.select(ids[0]), {"camera": True}, mode="remove")


def test_schema_error_names_at_most_ten_samples(dataset):
    make_samples(dataset, 13)
    bl.set_metadata_schema(dataset, SCHEMA)
    with pytest.raises(BulkLabelingError) as err:
        bl.edit_metadata(dataset, {"iso": 100})
    message = str(err.value)
    assert message.startswith("13 sample(s) would violate")
    assert message.count("\n- sample ") == 10
    assert message.endswith("... and 3 more")


def test_validate_documents_for_uploads(dataset):
    make_samples(dataset, 1)
    # no schema: a no-op
    assert meta.validate_documents(dataset, FIELD, [("new samples", {"x": 1})]) == 0
    bl.set_metadata_schema(dataset, SCHEMA)
    assert meta.validate_documents(dataset, FIELD, [("a.jpg", {"camera": "A"})]) == 1
    with pytest.raises(BulkLabelingError, match="a.jpg: \\(root\\): 'camera' is a required"):
        meta.validate_documents(dataset, FIELD, [("a.jpg", {"iso": 100})])


# --------------------------------------------------------------------------
# undo
# --------------------------------------------------------------------------


def _without_last_modified(docs):
    return [{k: v for k, v in d.items() if k != "last_modified_at"} for d in docs]


@pytest.mark.parametrize(
    "mode,payload",
    [
        ("merge", MERGE),
        ("merge", {"camera": "A7"}),
        ("overwrite", {"camera": "B"}),
        ("overwrite", {}),
        ("remove", {"camera": True, "site": {"row": True}}),
    ],
)
def test_undo_restores_exactly(dataset, mode, payload):
    seed(dataset, PRIORS + [{"flag": True}, {"site": {"row": 1.0}}])
    before = _without_last_modified(raw_docs(dataset))
    values = field_values(dataset)

    result = bl.edit_metadata(dataset, payload, mode=mode)
    assert result["changed"] > 0
    undone = bl.undo(dataset, result["operation_id"])

    assert undone["num_conflicts"] == 0
    assert undone["changed"] == result["changed"]
    if mode == "remove":
        # keys put back by undoing a remove come back last in their object
        assert unordered(field_values(dataset)) == unordered(values)
    else:
        assert field_values(dataset) == values
    assert _without_last_modified(raw_docs(dataset)) == before


def test_undo_restores_a_bool_overwritten_by_an_equal_number(dataset):
    # True == 1 in Python, not in BSON: the journal must not skip it
    ids = seed(dataset, [{"flag": True}, {"flag": 1.0}])
    values = field_values(dataset)
    result = bl.edit_metadata(dataset, {"flag": 1})
    assert result["changed"] == 1  # 1 over 1.0 is no change; over True it is
    bl.undo(dataset, result["operation_id"])
    assert field_values(dataset) == values
    assert db.sample_coll(dataset).find_one({"_id": db_id(ids[0])})[FIELD] == {"flag": True}


def test_undo_at_the_nesting_limit(dataset):
    deep = _deep(meta.MAX_DEPTH)
    seed(dataset, [{"k": {"k": {"x": 1}}}, "<absent>"])
    values = field_values(dataset)
    for mode, payload in [("merge", deep), ("overwrite", deep)]:
        result = bl.edit_metadata(dataset, payload, mode=mode)
        assert result["changed"] == 2
        bl.undo(dataset, result["operation_id"])
        assert field_values(dataset) == values

    bl.edit_metadata(dataset, deep, mode="overwrite")
    values = field_values(dataset)
    spec = json.loads(json.dumps(deep).replace("1", "true"))
    result = bl.edit_metadata(dataset, spec, mode="remove")
    assert result["changed"] == 2
    stored = db.sample_coll(dataset).find_one({}, {FIELD: 1})[FIELD]
    for _ in range(meta.MAX_DEPTH - 2):
        stored = stored["k"]
    assert stored == {}
    bl.undo(dataset, result["operation_id"])
    assert field_values(dataset) == values


def test_undo_after_a_later_edit_is_a_conflict(dataset):
    ids = seed(dataset, [{"camera": "old"}, "<absent>", {"camera": "old2", "site": 1}])
    first = bl.edit_metadata(dataset, {"camera": "A7"})
    # later: another key everywhere, and the same key on one sample
    bl.edit_metadata(dataset, {"site": {"row": 9}})
    bl.edit_metadata(dataset.select(ids[0]), {"camera": "later"})

    result = bl.undo(dataset, first["operation_id"])
    assert result["num_conflicts"] == 1
    assert result["conflicts"][0]["sample_id"] == ids[0]
    values = {str(k): v for k, v in field_values(dataset).items()}
    # the later edit is left alone; other keys of later edits are kept
    assert values[ids[0]] == ordered({"camera": "later", "site": {"row": 9}})
    assert values[ids[1]] == ordered({"site": {"row": 9}})
    assert values[ids[2]] == ordered({"camera": "old2", "site": {"row": 9}})


def test_undo_of_a_removal_never_turns_a_replaced_document_into_an_object(dataset):
    ids = seed(dataset, [{"a": 1, "b": 2}, {"a": 3, "b": 4}, {"a": 5}])
    first = bl.edit_metadata(dataset, {"a": True}, mode="remove")
    # later, raw writes: one document replaced by a string, one removed
    coll = db.sample_coll(dataset)
    coll.update_one({"_id": db_id(ids[0])}, {"$set": {FIELD: "replaced"}})
    coll.update_one({"_id": db_id(ids[1])}, {"$unset": {FIELD: ""}})

    result = bl.undo(dataset, first["operation_id"])
    assert result["num_conflicts"] == 2
    assert {c["sample_id"] for c in result["conflicts"]} == set(ids[:2])
    values = {str(k): v for k, v in field_values(dataset).items()}
    assert values[ids[0]] == ordered("replaced")
    assert values[ids[1]] == "<absent>"
    # the untouched sample gets its key back, in the order it had
    assert values[ids[2]] == ordered({"a": 5})


def test_undo_overwrite_after_a_later_edit_is_a_conflict(dataset):
    ids = seed(dataset, [{"a": 1}, {"a": 2}])
    first = bl.edit_metadata(dataset, {"b": 1}, mode="overwrite")
    bl.edit_metadata(dataset.select(ids[1]), {"c": 1})
    result = bl.undo(dataset, first["operation_id"])
    assert result["num_conflicts"] == 1
    values = {str(k): v for k, v in field_values(dataset).items()}
    assert values[ids[0]] == ordered({"a": 1})
    assert values[ids[1]] == ordered({"b": 1, "c": 1})


# --------------------------------------------------------------------------
# geolocation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lat,lon,message",
    [
        (90.01, 0, "between -90 and 90"),
        (-91, 0, "between -90 and 90"),
        (0, 180.5, "between -180 and 180"),
        (0, -181, "between -180 and 180"),
        (float("nan"), 0, "finite"),
        (0, float("inf"), "finite"),
        (True, 0, "not a boolean"),
        (0, "east", "must be a number"),
        (None, 0, "required"),
        (0, None, "required"),
        ([1], 0, "must be a number"),
    ],
)
def test_geolocation_ranges(dataset, lat, lon, message):
    make_samples(dataset, 2)
    before = raw_docs(dataset)
    with pytest.raises(BulkLabelingError, match=_escape(message)):
        bl.set_geolocation(dataset, latitude=lat, longitude=lon)
    assert raw_docs(dataset) == before
    assert "location" not in dataset.get_field_schema()


def test_geolocation_set_and_remove(dataset):
    ids = make_samples(dataset, 4)
    assert meta.parse_coordinates(-90, 180) == (-90.0, 180.0)
    result = bl.set_geolocation(dataset.select(ids[:3]), latitude=48.8584,
                                longitude=2.2945)
    assert result["matched"] == 3 and result["changed"] == 3

    field = dataset.get_field("location")
    assert isinstance(field, fof.EmbeddedDocumentField)
    assert field.document_type is fo.GeoLocation
    sample = dataset[ids[0]]
    assert isinstance(sample.location, fo.GeoLocation)
    assert sample.location.point == [2.2945, 48.8584]
    # stored exactly as FiftyOne stores a GeoLocation (the Map panel reads
    # location.point.coordinates)
    stored = db.sample_coll(dataset).find_one({"_id": db_id(ids[0])})["location"]
    native = fo.GeoLocation(point=[2.2945, 48.8584]).to_dict()
    assert list(stored) == list(native)
    assert stored["point"] == {"type": "Point", "coordinates": [2.2945, 48.8584]}
    assert len({str(d["location"]["_id"]) for d in db.sample_coll(dataset).find(
        {"location": {"$exists": True}})}) == 3
    # geo queries work
    near = dataset.geo_near([2.29, 48.86], max_distance=5000, create_index=True)
    assert len(near) == 3

    # setting the same point again changes nothing; a new point keeps the id
    assert bl.set_geolocation(dataset.select(ids[:3]), 48.8584, 2.2945)["changed"] == 0
    label_id = sample.location.id
    bl.set_geolocation(dataset.select(ids[0]), 40.0, -3.5)
    assert dataset[ids[0]].location.id == label_id
    assert dataset[ids[0]].location.point == [-3.5, 40.0]

    result = bl.set_geolocation(dataset, mode="remove")
    assert result["matched"] == 4 and result["changed"] == 3
    assert len(dataset.exists("location")) == 0
    assert "location" not in db.sample_coll(dataset).find_one({"_id": db_id(ids[0])})


def test_geolocation_undo_round_trips(dataset):
    ids = make_samples(dataset, 3)
    bl.set_geolocation(dataset.select(ids[0]), 10, 20)
    before = _without_last_modified(raw_docs(dataset))

    result = bl.set_geolocation(dataset, latitude=-33.9, longitude=151.2)
    assert result["changed"] == 3
    undone = bl.undo(dataset, result["operation_id"])
    assert undone["num_conflicts"] == 0
    assert _without_last_modified(raw_docs(dataset)) == before

    result = bl.set_geolocation(dataset, mode="remove")
    assert result["changed"] == 1
    bl.undo(dataset, result["operation_id"])
    assert _without_last_modified(raw_docs(dataset)) == before


def test_geolocation_field_checks(dataset):
    make_samples(dataset, 1)
    dataset.add_sample_field("gps", fo.StringField)
    with pytest.raises(BulkLabelingError, match="not a GeoLocation field"):
        bl.set_geolocation(dataset, 1, 2, field="gps")
    with pytest.raises(BulkLabelingError, match="reserved"):
        bl.set_geolocation(dataset, 1, 2, field="metadata")
    with pytest.raises(BulkLabelingError, match="mode"):
        bl.set_geolocation(dataset, 1, 2, mode="move")


# --------------------------------------------------------------------------
# operators
# --------------------------------------------------------------------------


def test_operators_are_registered():
    registry = OperatorRegistry()
    assert registry.list_errors() == []
    for name in ("edit_metadata", "set_metadata_schema", "set_geolocation"):
        assert registry.operator_exists(uri(name))


def test_edit_metadata_operator(dataset):
    ids = make_samples(dataset, 5)
    result = run_operator(
        "edit_metadata", dataset=dataset, selected=ids[:2],
        params={"metadata": '{"camera": "A7", "site": {"row": 3}}'},
    )
    assert result["matched"] == 2 and result["changed"] == 2
    assert len(dataset.match(F(FIELD + ".camera") == "A7")) == 2

    # a dict payload, the current view, a dry run
    result = run_operator(
        "edit_metadata", dataset=dataset,
        view=dataset.match(F(FIELD + ".camera") == "A7"),
        params={"metadata": {"site": {"row": True}}, "mode": "remove", "dry_run": True},
    )
    assert result == {"operation_id": None, "matched": 2, "changed": 2, "dry_run": True}
    result = run_operator(
        "edit_metadata", dataset=dataset, selected=ids[:2],
        params={"metadata": {"site": {"row": True}}, "mode": "remove"},
    )
    assert result["changed"] == 2
    assert meta.user_document(dataset[ids[0]][FIELD].to_dict()) == {
        "camera": "A7", "site": {}}

    # invalid input: an error, nothing written
    before = raw_docs(dataset)
    for params in [{"metadata": '{"$set": 1}'}, {"metadata": "[1]"},
                   {"metadata": '{"a": 1}', "mode": "bogus"},
                   {"metadata": '{"a": 1}', "field": "metadata"}]:
        with pytest.raises(Exception, match="Metadata|mode|reserved"):
            run_operator("edit_metadata", dataset=dataset, params=params)
    assert raw_docs(dataset) == before

    # undo through the journal operator
    result = run_operator("undo_bulk_operation", dataset=dataset)
    assert result["changed"] == 2
    assert meta.user_document(dataset[ids[0]][FIELD].to_dict()) == {
        "camera": "A7", "site": {"row": 3}}


def _resolve_inputs(dataset, name, params, selected=None):
    request = {
        "dataset_name": dataset.name,
        "view": dataset.view()._serialize(),
        "params": params,
        "selected": selected or [],
    }
    prop = asyncio.run(resolve_type(OperatorRegistry(), uri(name), request))
    return json.dumps(prop.to_json())


def test_edit_metadata_form_validates_and_previews(dataset):
    ids = seed(dataset, [{"camera": "old", "site": {"col": 1}}, "<absent>"])
    form = _resolve_inputs(dataset, "edit_metadata",
                           {"metadata": '{"site": {"row": 3}}'}, selected=[ids[0]])
    assert "TextFieldView" in form and "\"multiline\": true" in form
    assert "1 sample(s) targeted, 1 will change" in form
    # the preview shows the merged document of one sample
    assert '\\"row\\": 3' in form and '\\"col\\": 1' in form

    form = _resolve_inputs(dataset, "edit_metadata", {"metadata": '{"a.b": 1}'})
    assert "cannot contain '.'" in form
    form = _resolve_inputs(dataset, "edit_metadata", {"metadata": '{"a": '})
    assert "not valid JSON" in form

    bl.set_metadata_schema(dataset, {"required": ["camera"]})
    form = _resolve_inputs(dataset, "edit_metadata", {"metadata": '{"a": 1}'},
                           selected=[ids[1]])
    assert "would violate the schema" in form
    assert raw_docs(dataset)[1].get(FIELD) is None


def test_json_inputs_can_be_a_code_editor(dataset, monkeypatch):
    seed(dataset, [{"camera": "old"}])
    monkeypatch.setenv("BULK_LABELING_JSON_EDITOR", "code")
    for name, params in (("edit_metadata", {"metadata": '{"a": '}),
                         ("set_metadata_schema", {"schema": '{"type": "nope"}'})):
        form = _resolve_inputs(dataset, name, params)
        assert "CodeView" in form and '"language": "json"' in form
        assert "TextFieldView" not in form
        # validated inline as with the text area
        assert "not valid JSON" in form or "Invalid JSON Schema" in form


def test_set_metadata_schema_operator(dataset):
    seed(dataset, [{"camera": 1}, {"camera": "A"}])
    form = _resolve_inputs(dataset, "set_metadata_schema", {"schema": '{"type": "nope"}'})
    assert "Invalid JSON Schema" in form

    result = run_operator("set_metadata_schema", dataset=dataset,
                          params={"schema": json.dumps(SCHEMA)})
    assert result["schema"] == "set" and result["violations"] == 1
    assert bl.get_metadata_schema(dataset) == SCHEMA

    form = _resolve_inputs(dataset, "set_metadata_schema", {})
    assert "required" in form  # the current schema is the editor's default

    with pytest.raises(Exception, match="string"):
        run_operator("edit_metadata", dataset=dataset, params={"metadata": {"camera": 5}})

    result = run_operator("set_metadata_schema", dataset=dataset, params={"schema": ""})
    assert result["schema"] == "cleared"
    assert bl.get_metadata_schema(dataset) is None


def test_set_geolocation_operator(dataset):
    ids = make_samples(dataset, 3)
    result = run_operator("set_geolocation", dataset=dataset, selected=ids[:2],
                          params={"latitude": 10.5, "longitude": -20.25})
    assert result["matched"] == 2 and result["changed"] == 2
    assert dataset[ids[0]].location.point == [-20.25, 10.5]

    form = _resolve_inputs(dataset, "set_geolocation", {"latitude": 100, "longitude": 0})
    assert "between -90 and 90" in form
    before = raw_docs(dataset)
    # FiftyOne's own param validation (the form's min/max) or ours
    with pytest.raises(Exception, match="180"):
        run_operator("set_geolocation", dataset=dataset,
                     params={"latitude": 0, "longitude": 200})
    with pytest.raises(Exception, match="not a boolean|Invalid value type"):
        run_operator("set_geolocation", dataset=dataset,
                     params={"latitude": 0, "longitude": True})
    assert raw_docs(dataset) == before

    result = run_operator("set_geolocation", dataset=dataset,
                          params={"mode": "remove", "view_target": "DATASET"})
    assert result["matched"] == 3 and result["changed"] == 2


# --------------------------------------------------------------------------
# concurrency
# --------------------------------------------------------------------------


# Runs in a spawned process that imports only FiftyOne and the plugin (not
# this module, hence not conftest); the environment comes from the parent
_EDITOR = """
import bulk_labeling as bl
import fiftyone as fo

dataset = fo.load_dataset(dataset_name)
view = dataset.select(ids)
# start editing together, once every process has imported FiftyOne
barrier.wait(120)
for i in range(rounds):
    bl.edit_metadata(view, {key: {"round": i, "by": key}}, progress=False)
"""


def test_concurrent_editors_of_different_keys_lose_nothing(dataset):
    ids = make_samples(dataset, 60)
    dataset.persistent = True
    # overlapping targets: every sample is edited by at least two editors
    targets = {"a": ids[:40], "b": ids[20:], "c": ids[::2]}
    rounds = 6
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(targets))
    procs = [
        ctx.Process(
            target=exec,
            args=(_EDITOR, {"dataset_name": dataset.name, "ids": t, "key": key,
                            "rounds": rounds, "barrier": barrier}),
        )
        for key, t in targets.items()
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0

    for doc in raw_docs(dataset):
        value = doc[FIELD]
        for key, t in targets.items():
            if str(doc["_id"]) in t:
                assert value[key] == {"round": rounds - 1, "by": key}
            else:
                assert key not in value
    ops = history.list_operations(dataset, limit=0)
    assert len(ops) == 3 * rounds
    assert all(op["status"] == history.APPLIED for op in ops)


def test_edit_sample_metadata_targets_only_the_sample_being_viewed(dataset):
    ids = seed(dataset, ["<absent>", "<absent>", "<absent>"])
    result = run_operator("edit_sample_metadata", dataset=dataset,
                          current_sample=ids[2],
                          params={"metadata": {"camera": "A7"}})
    assert result["matched"] == 1 and result["changed"] == 1
    assert dataset.values("custom_metadata.camera") == [None, None, "A7"]
