"""The operation journal: history contents, exact undo, conflicts, dry runs
and crash safety, against a real mongod."""

import os
import signal
import subprocess
import sys
import time

import pytest
from bson import ObjectId, encode

import fiftyone as fo

import bulk_labeling as bl
from bulk_labeling.core import database as db

from conftest import REPO, insert_bare_samples, make_samples, run_operator


def snapshot(dataset, *fields):
    """Sample documents without ``last_modified_at``, which undo updates."""
    docs = {}
    for doc in db.sample_coll(dataset).find():
        doc.pop("last_modified_at")
        docs[doc["_id"]] = doc
    return docs


def label_ids(doc, field="concepts"):
    return [c["_id"] for c in ((doc.get(field) or {}).get("classifications") or [])]


def test_history_lists_operations_newest_first(dataset):
    ids = make_samples(dataset, 5)
    first = bl.label(dataset.select(ids[:2]), add=["cat"])
    second = run_operator("label_as", dataset=dataset, selected=ids[2:],
                          params={"concepts": ["dog"]})
    bl.label(dataset, add=["dog"], dry_run=True)  # not journaled

    result = run_operator("bulk_history", dataset=dataset, params={"limit": 10})
    ops = result["operations"]
    assert [o["operation_id"] for o in ops] == [second["operation_id"],
                                                first["operation_id"]]
    latest = ops[0]
    assert latest["type"] == "label_as"
    assert latest["status"] == "applied"
    assert latest["matched"] == 3 and latest["changed"] == 3
    assert latest["params"]["add"] == ["dog"]
    assert latest["target"]["count"] == 3
    assert latest["target"]["kind"] == "SELECTED_SAMPLES"
    assert latest["started_at"] <= latest["ended_at"]
    assert result["pending"] == 0

    limited = run_operator("bulk_history", dataset=dataset, params={"limit": 1})
    assert len(limited["operations"]) == 1
    assert run_operator("bulk_history", dataset=dataset,
                        params={"types": ["undo"]})["operations"] == []


def test_journal_lives_outside_the_samples(dataset):
    make_samples(dataset, 3)
    before_keys = {k for d in db.sample_coll(dataset).find() for k in d}
    bl.label(dataset, add=["cat"])
    after_keys = {k for d in db.sample_coll(dataset).find() for k in d}
    assert after_keys - before_keys == {"concepts"}
    bl.label(dataset, remove=["cat"])
    after_keys = {k for d in db.sample_coll(dataset).find() for k in d}
    assert after_keys == before_keys


def test_undo_add_restores_the_exact_prior_state(dataset):
    ids = make_samples(dataset, 6)
    bl.label(dataset.select(ids[:3]), add=["cat"])
    before = snapshot(dataset)
    result = bl.label(dataset, add=["cat", "dog"])
    undo = run_operator("undo_bulk_operation", dataset=dataset)
    assert undo["undone"] == result["operation_id"]
    assert undo["changed"] == 6 and undo["num_conflicts"] == 0
    assert snapshot(dataset) == before


def test_undo_of_a_remove_restores_the_same_label_ids(dataset):
    ids = make_samples(dataset, 4)
    sample = dataset[ids[0]]
    sample["concepts"] = fo.Classifications(classifications=[
        fo.Classification(label="cat", confidence=0.9, tags=["checked"]),
        fo.Classification(label="dog"),
    ])
    sample.save()
    bl.label(dataset, add=["cat"])
    before = snapshot(dataset)
    original_ids = {i: label_ids(d) for i, d in before.items()}

    result = bl.label(dataset, remove=["cat"])
    assert result["changed"] == 4
    bl.undo(dataset, result["operation_id"])

    after = snapshot(dataset)
    for _id, doc in after.items():
        assert sorted(label_ids(doc)) == sorted(original_ids[_id])
        # The same labels, attributes included
        key = lambda c: str(c["_id"])
        assert sorted(doc["concepts"]["classifications"], key=key) == sorted(
            before[_id]["concepts"]["classifications"], key=key)


def test_undo_of_negative_add_restores_the_positive_labels(dataset):
    ids = make_samples(dataset, 3)
    bl.label(dataset, add=["cat"])
    before = snapshot(dataset)
    result = bl.label(dataset.select(ids[:2]), add=["cat"], negative=True)
    assert result["changed"] == 2
    bl.undo(dataset)
    after = snapshot(dataset)
    for _id in before:
        assert label_ids(after[_id]) == label_ids(before[_id])
        assert label_ids(after[_id], "concepts_negative") == []


def test_undo_of_rename_and_delete(dataset):
    ids = make_samples(dataset, 4)
    bl.label(dataset.select(ids[:3]), add=["cat"])
    bl.label(dataset.select(ids[2:]), add=["kitty"])
    before = snapshot(dataset)

    bl.rename_concept(dataset, "cat", "kitty")
    bl.delete_concept(dataset, "kitty")
    assert all(label_ids(d) == [] for d in snapshot(dataset).values())

    bl.undo(dataset)  # the delete
    bl.undo(dataset)  # the rename
    after = snapshot(dataset)
    for _id in before:
        key = lambda c: str(c["_id"])
        assert sorted(after[_id]["concepts"]["classifications"], key=key) == \
            sorted(before[_id]["concepts"]["classifications"], key=key)


def test_undoing_several_operations_in_reverse_order(dataset):
    ids = make_samples(dataset, 10)
    original = snapshot(dataset)
    bl.label(dataset.select(ids[:6]), add=["a", "b"])
    bl.label(dataset.select(ids[3:]), remove=["a"])
    bl.label(dataset.select(ids[5:]), add=["a"], negative=True)
    bl.rename_concept(dataset, "b", "c")
    for _ in range(4):
        bl.undo(dataset)

    after = snapshot(dataset)
    for _id, doc in after.items():
        assert label_ids(doc) == [] and label_ids(doc, "concepts_negative") == []
        # Fields the operations created stay, empty
        doc.pop("concepts", None)
        doc.pop("concepts_negative", None)
        assert doc == original[_id]


def test_undo_after_a_later_edit_reports_a_conflict_and_leaves_it(dataset):
    ids = make_samples(dataset, 3)
    bl.label(dataset, add=["cat"])
    removal = bl.label(dataset, remove=["cat"])
    # Someone re-adds "cat" to one sample afterwards
    later = bl.label(dataset.select(ids[:1]), add=["cat"])
    later_label = label_ids(snapshot(dataset)[ObjectId(ids[0])])

    result = bl.undo(dataset, removal["operation_id"])
    assert result["num_conflicts"] == 1
    assert result["conflicts"][0]["sample_id"] == ids[0]
    assert "re-added" in result["conflicts"][0]["reason"]
    after = snapshot(dataset)
    # The later label is kept; the others got their original back
    assert label_ids(after[ObjectId(ids[0])]) == later_label
    for sample_id in ids[1:]:
        assert len(label_ids(after[ObjectId(sample_id)])) == 1
    assert later["changed"] == 1


def test_undo_is_journaled_and_cannot_be_repeated(dataset):
    make_samples(dataset, 2)
    op = bl.label(dataset, add=["cat"])
    undo = bl.undo(dataset)
    ops = bl.history(dataset)
    assert [o["type"] for o in ops] == ["undo", "label_as"]
    assert ops[0]["operation_id"] == undo["operation_id"]
    assert ops[0]["params"] == {"operation_id": op["operation_id"]}
    assert ops[1]["status"] == "undone"
    assert ops[1]["undone_by"] == undo["operation_id"]
    with pytest.raises(bl.BulkLabelingError, match="undone"):
        bl.undo(dataset, op["operation_id"])
    with pytest.raises(bl.BulkLabelingError, match="no bulk operation to undo"):
        bl.undo(dataset)
    with pytest.raises(bl.BulkLabelingError, match="not a valid operation id"):
        bl.undo(dataset, "nope")


def test_dry_runs_write_nothing(dataset):
    make_samples(dataset, 4)
    op = bl.label(dataset, add=["cat"])
    before = {d["_id"]: d for d in db.sample_coll(dataset).find()}
    history_before = bl.history(dataset)
    preview = run_operator("undo_bulk_operation", dataset=dataset,
                           params={"dry_run": True})
    assert preview["dry_run"] and preview["matched"] == 4
    assert preview["operation_id"] is None
    for kwargs in ({"add": ["dog"]}, {"remove": ["cat"]},
                   {"add": ["cat"], "negative": True}):
        result = bl.label(dataset, dry_run=True, **kwargs)
        assert result["dry_run"] and result["changed"] == 4
    assert bl.rename_concept(dataset, "cat", "dog", dry_run=True)["changed"] == 4
    assert bl.delete_concept(dataset, "cat", dry_run=True)["changed"] == 4
    assert {d["_id"]: d for d in db.sample_coll(dataset).find()} == before
    assert bl.history(dataset) == history_before
    assert dataset.classes["concepts"] == ["cat"]


@pytest.mark.parametrize("workers,sizes", [("1", [100_000, 20_000]),
                                           ("8", [15_000] * 8)])
def test_inversion_data_is_chunked_below_the_document_limit(
        dataset, monkeypatch, workers, sizes):
    # Chunks hold at most 100k ids, and every writer gets one
    monkeypatch.setenv("BULK_LABELING_WRITE_WORKERS", workers)
    insert_bare_samples(dataset, 120_000)
    bl.label(dataset, add=["cat"])
    result = bl.label(dataset, remove=["cat"])
    conn = db.get_db()
    op_id = ObjectId(result["operation_id"])
    chunks = list(conn[db.TARGETS_COLLECTION].find({"op_id": op_id}))
    assert sorted(len(c["ids"]) for c in chunks) == sorted(sizes)
    assert max(len(encode(c)) for c in chunks) < 16 * 1024 * 1024
    captures = list(conn[db.UNDO_COLLECTION].find({"op_id": op_id}))
    assert sum(len(c["entries"]) for c in captures) == 120_000
    assert len(captures) < 200
    assert max(len(encode(c)) for c in captures) < 16 * 1024 * 1024


def test_a_bad_writer_setting_is_a_clear_error_that_writes_nothing(
        dataset, monkeypatch):
    make_samples(dataset, 5)
    before = snapshot(dataset)
    history_before = bl.history(dataset)
    monkeypatch.setenv("BULK_LABELING_WRITE_WORKERS", "two")
    for call in (lambda: bl.label(dataset, add=["cat"]),
                 lambda: bl.edit_metadata(dataset, {"a": 1})):
        with pytest.raises(bl.BulkLabelingError,
                           match="BULK_LABELING_WRITE_WORKERS must be an integer"):
            call()
    assert snapshot(dataset) == before
    assert bl.history(dataset) == history_before


# --- crash safety ------------------------------------------------------------

_CHILD = r"""
import os, sys
sys.path.insert(0, os.environ["REPO_PLUGINS"])
import fiftyone as fo
import bulk_labeling as bl
from bulk_labeling.core import database as db
db.ID_BATCH_SIZE = 5_000  # many small batches, so a kill lands mid-way
ds = fo.load_dataset(sys.argv[1])
print("start", flush=True)
if sys.argv[2] == "add":
    bl.label(ds, add=["crash"], progress=False)
else:
    bl.label(ds, remove=["crash"], progress=False)
print("done", flush=True)
"""


def _start_and_kill(dataset, mode="add"):
    env = dict(os.environ)
    client = db.get_db().client
    host, port = client.address
    env["FIFTYONE_DATABASE_URI"] = "mongodb://%s:%d" % (host, port)
    env["REPO_PLUGINS"] = str(REPO / "plugins")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, dataset.name, mode],
                            env=env, stdout=subprocess.PIPE)
    ops = db.get_db()[db.OPERATIONS_COLLECTION]
    deadline = time.time() + 120
    while time.time() < deadline:
        record = ops.find_one({"dataset_id": dataset._doc.id, "type": "label_as",
                               "params.remove": [] if mode == "add" else ["crash"],
                               "status": "pending", "batches_done": {"$gte": 3}})
        if record is not None:
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("the child never got mid-way")

    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return str(record["_id"])


def _count_labeled(dataset):
    return db.sample_coll(dataset).count_documents(
        {"concepts.classifications.label": "crash"})


@pytest.mark.slow
def test_a_killed_operation_is_surfaced_and_can_be_undone_or_resumed(dataset):
    dataset.persistent = True
    total = 200_000
    insert_bare_samples(dataset, total)

    # Killed mid-way: half-applied, and the record says so
    op_id = _start_and_kill(dataset)
    labeled = _count_labeled(dataset)
    assert 0 < labeled < total
    pending = bl.pending(dataset)
    assert [p["operation_id"] for p in pending] == [op_id]
    assert run_operator("bulk_history", dataset=dataset)["pending"] == 1

    # Undo brings it to nothing
    result = bl.undo(dataset, op_id)
    assert result["num_conflicts"] == 0
    assert _count_labeled(dataset) == 0
    assert bl.pending(dataset) == []

    # Killed again: resume brings it to everything, with unique label ids
    op_id = _start_and_kill(dataset)
    assert 0 < _count_labeled(dataset) < total
    run_operator("resume_bulk_operation", dataset=dataset,
                 params={"operation_id": op_id})
    assert _count_labeled(dataset) == total
    ids = db.sample_coll(dataset).distinct("concepts.classifications._id")
    assert len(ids) == total
    record = [o for o in bl.history(dataset) if o["operation_id"] == op_id][0]
    assert record["status"] == "applied"


def _crash_labels(dataset):
    """``{(sample id, label id)}`` of every "crash" label."""
    pipeline = [
        {"$unwind": "$concepts.classifications"},
        {"$match": {"concepts.classifications.label": "crash"}},
        {"$project": {"label_id": "$concepts.classifications._id"}},
    ]
    return {(d["_id"], d["label_id"])
            for d in db.sample_coll(dataset).aggregate(pipeline)}


@pytest.mark.slow
def test_a_killed_remove_is_undone_or_resumed_exactly(dataset):
    """A remove copies each chunk's labels before writing it, on parallel
    writers: a kill at any point leaves every removed label recoverable."""
    dataset.persistent = True
    total = 200_000
    insert_bare_samples(dataset, total)
    bl.label(dataset, add=["crash", "keep"])
    before = _crash_labels(dataset)
    assert len(before) == total

    # Killed mid-way: undo puts back every removed label, with its id
    op_id = _start_and_kill(dataset, mode="remove")
    assert 0 < _count_labeled(dataset) < total
    result = bl.undo(dataset, op_id)
    assert result["num_conflicts"] == 0
    assert _crash_labels(dataset) == before

    # Killed again: resume finishes it, and undo still restores it all
    op_id = _start_and_kill(dataset, mode="remove")
    assert 0 < _count_labeled(dataset) < total
    bl.resume(dataset, op_id)
    assert _count_labeled(dataset) == 0
    coll = db.sample_coll(dataset)
    assert coll.count_documents({"concepts.classifications.label": "keep"}) == total
    result = bl.undo(dataset, op_id)
    assert result["num_conflicts"] == 0
    assert _crash_labels(dataset) == before
