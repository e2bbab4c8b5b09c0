"""Label as...: targets, add/remove/negative, idempotence, label ids,
vocabulary, bad input and concurrency, through the operator and the Python
API, against a real mongod."""

import datetime
import multiprocessing
import os

import pytest
from bson import ObjectId

import fiftyone as fo
from fiftyone import ViewField as F

import bulk_labeling as bl
from bulk_labeling.core import database as db

from conftest import make_samples, run_operator


def labels_by_sample(dataset, field="concepts"):
    return {
        str(doc["_id"]): sorted(
            c["label"] for c in ((doc.get(field) or {}).get("classifications") or [])
        )
        for doc in db.sample_coll(dataset).find({}, {field: 1})
    }


def raw_docs(dataset):
    return {doc["_id"]: doc for doc in db.sample_coll(dataset).find()}


def all_label_ids(dataset, *fields):
    ids = []
    for doc in db.sample_coll(dataset).find():
        for field in fields:
            for label in (doc.get(field) or {}).get("classifications") or []:
                ids.append(label["_id"])
    return ids


# --- targets -----------------------------------------------------------------


def test_selected_samples_are_the_default_target(dataset):
    ids = make_samples(dataset, 10)
    result = run_operator(
        "label_as", dataset=dataset, selected=ids[2:5],
        params={"concepts": ["cat"]},
    )
    assert result["matched"] == 3 and result["changed"] == 3
    labels = labels_by_sample(dataset)
    assert [i for i in ids if labels[i] == ["cat"]] == ids[2:5]


def test_current_view_is_the_target_when_nothing_is_selected(dataset):
    ids = make_samples(dataset, 10)
    view = dataset.skip(6)
    result = run_operator(
        "label_as", dataset=dataset, view=view, params={"concepts": ["dog"]}
    )
    assert result == {
        "operation_id": result["operation_id"], "matched": 4, "changed": 4
    }
    labels = labels_by_sample(dataset)
    assert [i for i in ids if labels[i]] == ids[6:]


def test_explicit_view_targets(dataset):
    ids = make_samples(dataset, 10)
    view = dataset.limit(5)
    # DATASET ignores both the view and the selection
    result = run_operator(
        "label_as", dataset=dataset, view=view, selected=ids[:1],
        params={"concepts": ["all"], "view_target": "DATASET"},
    )
    assert result["matched"] == 10
    # CURRENT_VIEW ignores the selection
    result = run_operator(
        "label_as", dataset=dataset, view=view, selected=ids[:1],
        params={"concepts": ["some"], "view_target": "CURRENT_VIEW"},
    )
    assert result["matched"] == 5
    labels = labels_by_sample(dataset)
    assert sum("some" in v for v in labels.values()) == 5


def test_samples_outside_the_target_are_untouched(dataset):
    ids = make_samples(dataset, 6)
    before = raw_docs(dataset)
    bl.label(dataset.select(ids[:2]), add=["cat"])
    after = raw_docs(dataset)
    for sample_id in ids[2:]:
        assert after[ObjectId(sample_id)] == before[ObjectId(sample_id)]
    for sample_id in ids[:2]:
        _id = ObjectId(sample_id)
        assert after[_id]["last_modified_at"] >= before[_id]["last_modified_at"]
        assert after[_id]["concepts"]["classifications"][0]["label"] == "cat"


def test_similarity_sorted_view_labels_exactly_its_samples(dataset):
    # "apply to all search results": any ordered, limited view works
    ids = make_samples(dataset, 20)
    view = dataset.sort_by("filepath", reverse=True).limit(7)
    result = bl.label(view, add=["top"])
    assert result["matched"] == 7
    labels = labels_by_sample(dataset)
    assert sorted(i for i in ids if labels[i]) == sorted(view.values("id"))


# --- semantics ---------------------------------------------------------------


def test_add_is_idempotent_and_rerun_changes_nothing(dataset):
    ids = make_samples(dataset, 5)
    first = bl.label(dataset, add=["cat", "pet"])
    before = raw_docs(dataset)
    second = bl.label(dataset, add=["cat", "pet"])
    assert first["changed"] == 5
    assert second["changed"] == 0 and second["matched"] == 5
    assert raw_docs(dataset) == before  # last_modified_at included
    assert set(map(tuple, labels_by_sample(dataset).values())) == {("cat", "pet")}


def test_every_new_label_gets_a_unique_object_id(dataset):
    make_samples(dataset, 50)
    bl.label(dataset, add=["a", "b", "c"])
    bl.label(dataset.limit(20), add=["d"])
    bl.label(dataset.limit(20), add=["e"], negative=True)
    ids = all_label_ids(dataset, "concepts", "concepts_negative")
    assert len(ids) == 50 * 3 + 20 * 2
    assert len(set(ids)) == len(ids)
    assert all(isinstance(i, ObjectId) for i in ids)
    # FiftyOne sees them as ordinary labels
    sample = dataset.first()
    assert {c.id for c in sample.concepts.classifications} <= {str(i) for i in ids}
    view = dataset.select_labels(ids=[str(ids[0])])
    assert view.count("concepts.classifications") == 1


def test_remove_deletes_every_label_of_those_concepts(dataset):
    ids = make_samples(dataset, 4)
    sample = dataset.first()
    # A duplicate label written by someone else is removed too
    sample["concepts"] = fo.Classifications(
        classifications=[fo.Classification(label="cat"), fo.Classification(label="cat"),
                         fo.Classification(label="dog")]
    )
    sample.save()
    bl.label(dataset, add=["cat"])
    result = bl.label(dataset, remove=["cat"])
    assert result["changed"] == 4
    labels = labels_by_sample(dataset)
    assert labels[ids[0]] == ["dog"] and labels[ids[1]] == []
    # Removing what is not there changes nothing
    assert bl.label(dataset, remove=["cat"])["changed"] == 0


def test_negative_labels_live_in_a_sibling_field_and_exclude_positives(dataset):
    ids = make_samples(dataset, 4)
    bl.label(dataset, add=["cat"])
    result = run_operator(
        "label_as", dataset=dataset, selected=ids[:2],
        params={"concepts": ["cat"], "negative": True},
    )
    assert result["changed"] == 2
    pos = labels_by_sample(dataset)
    neg = labels_by_sample(dataset, "concepts_negative")
    assert [pos[i] for i in ids] == [[], [], ["cat"], ["cat"]]
    assert [neg[i] for i in ids] == [["cat"], ["cat"], [], []]
    assert "concepts_negative" in dataset.get_field_schema()

    # Adding it positively again removes the negative
    bl.label(dataset.select(ids[:1]), add=["cat"])
    pos = labels_by_sample(dataset)
    neg = labels_by_sample(dataset, "concepts_negative")
    assert pos[ids[0]] == ["cat"] and neg[ids[0]] == []

    # Removing negatives touches only the negative field
    run_operator("label_as", dataset=dataset, params={
        "concepts": ["cat"], "mode": "remove", "negative": True})
    assert all(v == [] for v in labels_by_sample(dataset, "concepts_negative").values())
    assert sum(v == ["cat"] for v in labels_by_sample(dataset).values()) == 3


def test_vocabulary_and_schema(dataset):
    make_samples(dataset, 3)
    bl.label(dataset, add=["  zebra ", "Zebra", "zebra"])
    assert dataset.classes["concepts"] == ["zebra", "Zebra"]
    schema = dataset.get_field_schema()
    assert isinstance(schema["concepts"], fo.EmbeddedDocumentField)
    assert schema["concepts"].document_type is fo.Classifications
    assert sorted(dataset.distinct("concepts.classifications.label")) == ["Zebra", "zebra"]
    # A concept used in a custom field goes to that field's vocabulary
    bl.label(dataset, add=["x"], field="tags_like")
    assert dataset.classes["tags_like"] == ["x"]
    # Python views filter on the labels
    assert len(dataset.match(F("concepts.classifications.label").contains("zebra"))) == 3


def test_manage_concepts_list_create_rename_delete(dataset):
    ids = make_samples(dataset, 6)
    created = run_operator("manage_concepts", dataset=dataset, params={
        "action": "create", "concepts": ["cat", "dog"]})
    assert created["created"] == ["cat", "dog"]
    bl.label(dataset.select(ids[:4]), add=["cat"])
    bl.label(dataset.select(ids[2:]), add=["dog"])
    bl.label(dataset.select(ids[5:]), add=["cat"], negative=True)

    listed = run_operator("manage_concepts", dataset=dataset,
                          params={"action": "list"})["concepts"]
    assert listed == [
        {"name": "cat", "count": 4, "negative_count": 1},
        {"name": "dog", "count": 4, "negative_count": 0},
    ]

    # Rename onto a concept a sample already has: no duplicate
    result = run_operator("manage_concepts", dataset=dataset, params={
        "action": "rename", "concept": "cat", "new_name": "dog"})
    assert result["changed"] == 5
    labels = labels_by_sample(dataset)
    assert all(v == ["dog"] for v in labels.values() if v)
    assert labels_by_sample(dataset, "concepts_negative")[ids[5]] == ["dog"]
    assert dataset.classes["concepts"] == ["dog"]

    result = run_operator("manage_concepts", dataset=dataset, params={
        "action": "delete", "concept": "dog"})
    assert result["changed"] == 6
    assert all(v == [] for v in labels_by_sample(dataset).values())
    assert dataset.classes["concepts"] == []


def test_rename_keeps_label_ids(dataset):
    make_samples(dataset, 3)
    bl.label(dataset, add=["cat"])
    before = all_label_ids(dataset, "concepts")
    bl.rename_concept(dataset, "cat", "kitty")
    assert all_label_ids(dataset, "concepts") == before
    assert set(dataset.distinct("concepts.classifications.label")) == {"kitty"}


def test_dry_run_counts_without_writing(dataset):
    ids = make_samples(dataset, 8)
    bl.label(dataset.select(ids[:3]), add=["cat"])
    before = raw_docs(dataset)
    result = run_operator("label_as", dataset=dataset, params={
        "concepts": ["cat"], "dry_run": True})
    assert result == {"operation_id": None, "matched": 8, "changed": 5,
                      "dry_run": True}
    assert raw_docs(dataset) == before
    assert len(bl.history(dataset)) == 1


# --- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "params, message",
    [
        ({"concepts": []}, "No concepts"),
        ({"concepts": ["   "]}, "cannot be empty"),
        ({"concepts": ["x" * 129]}, "longer than 128"),
        ({"concepts": ["bad\nname"]}, "control characters"),
        ({"concepts": ["cat"], "mode": "replace"}, "mode"),
        ({"concepts": ["cat"], "field": "filepath"}, "cannot hold concepts"),
        ({"concepts": ["cat"], "field": "ground_truth"}, "not a Classifications"),
    ],
)
def test_bad_input_gets_a_clear_error_and_writes_nothing(dataset, params, message):
    make_samples(dataset, 3)
    dataset.add_sample_field("ground_truth", fo.EmbeddedDocumentField,
                             embedded_doc_type=fo.Classification)
    before = raw_docs(dataset)
    schema_before = set(dataset.get_field_schema())
    with pytest.raises(Exception, match=message):
        run_operator("label_as", dataset=dataset, params=params)
    assert raw_docs(dataset) == before
    assert set(dataset.get_field_schema()) == schema_before
    assert "concepts" not in dataset.classes
    assert bl.history(dataset) == []


def test_empty_target_is_an_error(dataset):
    make_samples(dataset, 3)
    with pytest.raises(Exception, match="No samples are targeted"):
        run_operator("label_as", dataset=dataset, view=dataset.limit(0),
                     params={"concepts": ["cat"]})
    with pytest.raises(bl.BulkLabelingError, match="both|added and removed"):
        bl.label(dataset, add=["a"], remove=["a"])
    assert bl.history(dataset) == []


def test_concept_names_are_stored_literally(dataset):
    # A name that looks like a MongoDB field path must not be evaluated
    make_samples(dataset, 2)
    bl.label(dataset, add=["$filepath", "$$ROOT"])
    assert set(dataset.distinct("concepts.classifications.label")) == {
        "$filepath", "$$ROOT"}


# --- concurrency -------------------------------------------------------------


def _label_worker(env, dataset_name, ids, concept):
    os.environ.update(env)
    import fiftyone as fo_
    import bulk_labeling as bl_

    ds = fo_.load_dataset(dataset_name)
    bl_.label(ds.select(ids), add=[concept], progress=False)


@pytest.mark.slow
def test_concurrent_editors_never_lose_labels(dataset):
    dataset.persistent = True
    ids = make_samples(dataset, 8000)
    # Four overlapping windows of 5,000 samples
    windows = [ids[0:5000], ids[1000:6000], ids[2000:7000], ids[3000:8000]]
    env = {k: v for k, v in os.environ.items() if k.startswith("FIFTYONE_")}
    env["FIFTYONE_DATABASE_URI"] = fo.config.database_uri or _current_uri()
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_label_worker, args=(env, dataset.name, w, "c%d" % i))
        for i, w in enumerate(windows)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0

    labels = labels_by_sample(dataset)
    for i, window in enumerate(windows):
        for sample_id in window:
            assert "c%d" % i in labels[sample_id]
    dataset.reload()
    assert sorted(dataset.classes["concepts"]) == ["c0", "c1", "c2", "c3"]
    assert len(set(all_label_ids(dataset, "concepts"))) == 4 * 5000


def _current_uri():
    client = db.get_db().client
    host, port = client.address
    return "mongodb://%s:%d" % (host, port)


def test_label_sample_as_targets_only_the_sample_being_viewed(dataset):
    ids = make_samples(dataset, 5)
    result = run_operator("label_sample_as", dataset=dataset,
                          selected=ids[3:], current_sample=ids[1],
                          params={"concepts": ["cat"]})
    assert result["matched"] == 1 and result["changed"] == 1
    labeled = dataset.match(
        fo.ViewField("concepts.classifications.label").contains("cat"))
    assert labeled.values("id") == [ids[1]]

    # without an open sample it is a clear error, and nothing is written
    with pytest.raises(Exception, match="No sample is open"):
        run_operator("label_sample_as", dataset=dataset,
                     params={"concepts": ["dog"]})
    assert "dog" not in dataset.distinct("concepts.classifications.label")
