"""Delegated execution on FiftyOne's own engine: a real ``fiftyone delegated
launch`` worker process runs operations queued with
``request_delegation=True``, against the tests' real mongod.

Checked for every long operator: the samples are written, the delegated
operation's stored result has the same shape and counts as an immediate run,
progress reached the delegated-operation record, and the journal holds the
operation.
"""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from bson import ObjectId

import fiftyone as fo
import fiftyone.operators as foo
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionRunState
from fiftyone.operators.registry import OperatorRegistry

import bulk_labeling as bl
from bulk_labeling.core import database as db

from conftest import insert_bare_samples, run_operator, uri

RESULT_KEYS = {"operation_id", "matched", "changed"}

#: How long one delegated operation may take, queue to completion
OP_TIMEOUT = 90


def _database_uri():
    """The URI of the mongod the tests use, for the worker process."""
    if os.environ.get("FIFTYONE_DATABASE_URI"):
        return os.environ["FIFTYONE_DATABASE_URI"]
    host, port = db.get_db().client.address
    return "mongodb://%s:%d" % (host, port)


def _start_worker(log_path):
    """Starts a ``fiftyone delegated launch`` process on the tests' database
    and plugins dir, logging to ``log_path``."""
    db.get_db()  # make sure the tests' mongod is up before the worker starts
    env = dict(os.environ)
    env["FIFTYONE_DATABASE_URI"] = _database_uri()
    env["PYTHONUNBUFFERED"] = "1"
    # Two parallel writers on any machine, so batch sizes are known
    env["BULK_LABELING_WRITE_WORKERS"] = "2"
    exe = pathlib.Path(sys.executable).with_name("fiftyone")
    cmd = ([str(exe)] if exe.exists() else
           [sys.executable, "-c", "from fiftyone.core.cli import main; main()"])
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd + ["delegated", "launch"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log_path
    proc.log_file = log
    return proc


def _stop_worker(proc):
    proc.kill()
    proc.wait()
    proc.log_file.close()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """A worker process for the module's tests; killed at teardown."""
    proc = _start_worker(tmp_path_factory.mktemp("worker") / "worker.log")
    try:
        yield proc
    finally:
        _stop_worker(proc)


def _worker_log(worker):
    try:
        return worker.log_path.read_text()[-4000:]
    except OSError:
        return ""


def _queue(name, dataset, params, **ctx):
    """Queues an operator run with ``request_delegation=True``; returns the
    delegated operation's id."""
    request = dict(ctx, dataset=dataset, params=params, request_delegation=True)
    if "selected" in request:
        request["selected"] = [str(s) for s in request["selected"]]
    execution = foo.execute_operator(uri(name), ctx=request)
    execution.raise_exceptions()
    assert execution.delegated, "the operator ran immediately"
    return execution.result["id"]


def _wait(worker, op_id, timeout=OP_TIMEOUT):
    """Waits until the worker finished the operation, and returns its
    delegated-operation document plus every progress value seen on the
    record meanwhile."""
    dos = DelegatedOperationService()
    op_id = ObjectId(op_id)  # results carry ids as JSON strings
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        doc = dos.get(op_id)
        status = doc.status
        if status is not None and status.progress is not None:
            if not seen or seen[-1] != status.progress:
                seen.append(status.progress)
        if doc.run_state in (ExecutionRunState.COMPLETED,
                             ExecutionRunState.FAILED):
            break
        if worker.poll() is not None:
            pytest.fail("the worker exited (%s):\n%s"
                        % (worker.returncode, _worker_log(worker)))
        time.sleep(0.02)
    else:
        pytest.fail("operation %s still %s after %ds; worker log:\n%s"
                    % (op_id, doc.run_state, timeout, _worker_log(worker)))

    assert doc.run_state == ExecutionRunState.COMPLETED, (
        doc.result.error if doc.result else None, _worker_log(worker))
    return doc, seen


def _raw_doc(op_id):
    """The delegated operation's record as FiftyOne stores it."""
    return db.get_db()["delegated_ops"].find_one({"_id": ObjectId(op_id)})


def _raw_values(dataset, field):
    return [d.get(field) for d in db.sample_coll(dataset).find({}, {field: 1})]


def _journaled(dataset, operation_id, op_type):
    ops = {o["operation_id"]: o for o in bl.history(dataset, limit=0)}
    assert operation_id in ops, "the journal does not have the operation"
    op = ops[operation_id]
    assert op["type"] == op_type
    assert op["status"] == "applied"
    return op


@pytest.fixture
def persistent_dataset():
    ds = fo.Dataset()
    ds.persistent = True  # the worker is another process
    yield ds
    ds.delete()


def test_label_as_delegated_on_a_large_target(worker, persistent_dataset):
    dataset = persistent_dataset
    # Three id batches: two run at once on the worker's two writers, then
    # the third, so progress has a step to report in between
    total = 250_000
    insert_bare_samples(dataset, total)

    op_id = _queue("label_as", dataset, {"concepts": ["cat", "pet"]})
    doc, seen = _wait(worker, op_id)

    # The samples were labeled by the worker (another process: reload)
    dataset.reload()
    coll = db.sample_coll(dataset)
    assert coll.count_documents({"concepts.classifications.label": "cat"}) == total
    assert coll.count_documents({"concepts.classifications.label": "pet"}) == total
    assert bl.get_vocabulary(dataset) == ["cat", "pet"]

    # The stored result is the operator's result dict
    result = doc.result.result
    assert set(result) == RESULT_KEYS
    assert result["matched"] == total and result["changed"] == total

    # Progress went to the delegated-operation record, batch by batch
    raw = _raw_doc(op_id)
    assert raw["run_state"] == "completed"
    assert raw["status"]["progress"] == 1.0
    assert raw["status"]["label"] == "Labeling: %d / %d" % (total, total)
    assert raw["result"]["result"] == result
    assert any(0 < p < 1 for p in seen), seen

    op = _journaled(dataset, result["operation_id"], "label_as")
    assert op["matched"] == total and op["changed"] == total
    assert op["target"]["kind"] == "CURRENT_VIEW"

    # The same call run immediately returns the same shape (and changes
    # nothing: adding is idempotent)
    immediate = run_operator("label_as", dataset=dataset,
                             params={"concepts": ["cat", "pet"]})
    assert set(immediate) == set(result)
    assert immediate["matched"] == total and immediate["changed"] == 0


def test_delegated_result_equals_immediate_result(worker):
    """The same label_as on twin datasets, delegated and immediate."""
    twins = []
    for _ in range(2):
        ds = fo.Dataset()
        ds.persistent = True
        insert_bare_samples(ds, 30)
        bl.label(ds.limit(10), add=["cat"], progress=False)
        twins.append(ds)
    delegated_ds, immediate_ds = twins
    params = {"concepts": ["cat", "dog"]}
    try:
        op_id = _queue("label_as", delegated_ds, params,
                       view=delegated_ds.skip(5))
        delegated = _wait(worker, op_id)[0].result.result
        immediate = run_operator("label_as", dataset=immediate_ds,
                                 view=immediate_ds.skip(5), params=params)
        assert delegated.pop("operation_id") != immediate.pop("operation_id")
        assert delegated == immediate == {"matched": 25, "changed": 25}

        delegated_ds.reload()
        for ds in twins:
            assert ds.count_values("concepts.classifications.label") == {
                "cat": 30, "dog": 25}
        summaries = [bl.history(ds, limit=1)[0] for ds in twins]
        for key in ("type", "status", "params", "target", "matched",
                    "changed"):
            assert summaries[0][key] == summaries[1][key], key
    finally:
        for ds in twins:
            ds.delete()


def test_label_as_delegated_on_a_selection_and_a_view(worker,
                                                     persistent_dataset):
    dataset = persistent_dataset
    insert_bare_samples(dataset, 20)
    ids = dataset.values("id")

    op_sel = _queue("label_as", dataset, {"concepts": ["dog"]},
                    selected=ids[:5])
    view = dataset.skip(15)
    op_view = _queue("label_as", dataset,
                     {"concepts": ["bird"], "negative": True}, view=view)
    sel_doc, _ = _wait(worker, op_sel)
    view_doc, _ = _wait(worker, op_view)
    dataset.reload()

    assert sel_doc.result.result["matched"] == 5
    assert view_doc.result.result["matched"] == 5
    assert sorted(dataset.match_labels(
        filter=fo.ViewField("label") == "dog", fields="concepts").values("id")
    ) == sorted(ids[:5])
    assert sorted(dataset.exists("concepts_negative").values("id")) == sorted(
        ids[15:])
    op = _journaled(dataset, sel_doc.result.result["operation_id"], "label_as")
    assert op["target"]["kind"] == "SELECTED_SAMPLES"


def test_concept_rename_and_delete_delegated(worker, persistent_dataset):
    dataset = persistent_dataset
    insert_bare_samples(dataset, 1000)
    bl.label(dataset, add=["cat"], progress=False)
    bl.label(dataset.limit(400), add=["dog"], progress=False)

    immediate_dry = run_operator(
        "manage_concepts", dataset=dataset,
        params={"action": "rename", "concept": "cat", "new_name": "feline",
                "dry_run": True})

    op_id = _queue("manage_concepts", dataset,
                   {"action": "rename", "concept": "cat", "new_name": "feline"})
    doc, _ = _wait(worker, op_id)
    dataset.reload()
    result = doc.result.result
    assert set(result) == RESULT_KEYS
    assert result["matched"] == immediate_dry["matched"]
    assert result["changed"] == immediate_dry["changed"] == 1000
    assert dataset.count_values("concepts.classifications.label") == {
        "feline": 1000, "dog": 400}
    assert "cat" not in bl.get_vocabulary(dataset)
    raw = _raw_doc(op_id)
    assert raw["status"]["progress"] == 1.0 and raw["status"]["label"]
    _journaled(dataset, result["operation_id"], "rename_concept")

    op_id = _queue("manage_concepts", dataset,
                   {"action": "delete", "concept": "dog"})
    doc, _ = _wait(worker, op_id)
    dataset.reload()
    result = doc.result.result
    assert set(result) == RESULT_KEYS
    assert result["changed"] == 400
    assert dataset.count_values("concepts.classifications.label") == {
        "feline": 1000}
    assert _raw_doc(op_id)["status"]["progress"] == 1.0
    _journaled(dataset, result["operation_id"], "delete_concept")


def _registered(name):
    return OperatorRegistry().operator_exists(uri(name))


def test_edit_metadata_delegated(worker, persistent_dataset):
    if not _registered("edit_metadata"):
        pytest.skip("the edit_metadata operator does not exist yet")

    dataset = persistent_dataset
    insert_bare_samples(dataset, 500)
    payload = {"source": "camera-3", "site": {"name": "north"}}
    params = {"metadata": json.dumps(payload), "mode": "merge"}

    op_id = _queue("edit_metadata", dataset, params)
    doc, _ = _wait(worker, op_id)
    dataset.reload()
    result = doc.result.result
    assert RESULT_KEYS <= set(result)
    assert result["matched"] == 500 and result["changed"] == 500
    assert _raw_values(dataset, "custom_metadata") == [payload] * 500
    assert _raw_doc(op_id)["status"]["progress"] == 1.0
    _journaled(dataset, result["operation_id"], "edit_metadata")

    # An immediate run of the same edit has the same shape (and changes
    # nothing: the samples already hold the payload)
    immediate = run_operator("edit_metadata", dataset=dataset, params=params)
    assert set(immediate) == set(result)
    assert immediate["matched"] == 500


def test_upload_from_server_paths_delegated(worker, persistent_dataset,
                                            tmp_path):
    from bulk_labeling import demo_data

    dataset = persistent_dataset
    photos = [p for p, _ in demo_data.export_photos()][:6]
    assert photos, "the offline photos are missing"
    folder = tmp_path / "server_photos"
    folder.mkdir()
    for i, src in enumerate(photos):
        shutil.copy(src, folder / ("photo%d%s" % (i, pathlib.Path(src).suffix)))

    params = {"paths": [str(folder)], "concepts": ["animal"],
              "metadata": json.dumps({"source": "server"})}
    op_id = _queue("upload_with_concepts", dataset, params)
    doc, _ = _wait(worker, op_id)
    dataset.reload()
    result = doc.result.result
    assert result["added"] == len(photos), result
    assert dataset.count() == len(photos)
    assert dataset.count_values("concepts.classifications.label") == {
        "animal": len(photos)}
    assert _raw_values(dataset, "custom_metadata") == [
        {"source": "server"}] * len(photos)
    status = _raw_doc(op_id)["status"]
    assert status["progress"] > 0 and status["label"]
    _journaled(dataset, result["operation_id"], "upload")

    # Same result shape as an immediate run (which adds nothing new now)
    immediate = run_operator("upload_with_concepts", dataset=dataset,
                             params=params)
    assert set(immediate) == set(result)
    assert immediate["added"] == 0


@functools.lru_cache(maxsize=None)
def _tiny_clip():
    """The tiny CLIP's training script (as a module) and the build kwargs of
    its model, trained once if missing."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location(
        "train_tiny_clip", REPO / "scripts" / "train_tiny_clip.py")
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    ckpt, config = trainer.ensure_model()
    return trainer, {"model": "bl-tiny-clip", "pretrained": str(ckpt),
                     "model_config": str(config)}


def test_build_similarity_index_delegated(worker, persistent_dataset,
                                          tmp_path):
    from bulk_labeling.core import similarity as sim

    trainer, model = _tiny_clip()
    dataset = persistent_dataset
    items = trainer.write_held_out(tmp_path / "shapes", per_class=1, seed=99)
    dataset.add_samples([fo.Sample(filepath=p) for p, _ in items])
    params = dict(model, brain_key="delegated")

    op_id = _queue("build_similarity_index", dataset, params)
    doc, _ = _wait(worker, op_id, timeout=180)
    dataset.reload()
    result = doc.result.result
    assert result["brain_key"] == "delegated"
    assert result["indexed"] == result["added"] == len(items)
    status = sim.index_status(dataset, "delegated")
    assert status["indexed"] == len(items) and not status["stale"]
    raw = _raw_doc(op_id)
    assert raw["status"]["progress"] == 1.0
    assert raw["status"]["label"].startswith("Embedding images")

    # Text search works in this process on the index the worker built
    view = bl.find_similar(dataset, text="a photo of a red star", k=3,
                           brain_key="delegated")
    assert len(view) == 3

    # An immediate run (an update: nothing missing) has the same keys
    immediate = run_operator("build_similarity_index", dataset=dataset,
                             params=params)
    assert set(immediate) == set(result)
    assert immediate["added"] == 0 and immediate["indexed"] == len(items)


def test_sharded_index_build_with_two_workers(worker, persistent_dataset,
                                              tmp_path):
    """build_similarity_index with num_shards=2: each shard a delegated
    operation on a disjoint part of the dataset, picked up by any worker;
    the index is assembled when both are done and equals the single-worker
    index."""
    if not _registered("build_similarity_index_shard"):
        pytest.skip("build_similarity_index has no sharded mode yet "
                    "(no build_similarity_index_shard operator)")

    from bulk_labeling.core import similarity as sim

    trainer, model = _tiny_clip()
    dataset = persistent_dataset
    items = trainer.write_held_out(tmp_path / "shapes", per_class=2, seed=5)
    dataset.add_samples([fo.Sample(filepath=p) for p, _ in items])

    second = _start_worker(tmp_path / "worker2.log")
    try:
        op_id = _queue("build_similarity_index", dataset,
                       dict(model, brain_key="sharded", num_shards=2))
        parent = _wait(worker, op_id, timeout=120)[0].result.result
        shard_ops = parent["shard_operations"]
        assert len(shard_ops) == 2
        docs = [_wait(worker, i, timeout=180)[0] for i in shard_ops]
        deadline = time.time() + 60
        while time.time() < deadline:
            dataset.reload()
            if ("sharded" in dataset.list_brain_runs() and
                    sim.index_status(dataset, "sharded")["indexed"] == len(items)):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the sharded index was never assembled")
    finally:
        _stop_worker(second)

    # Disjoint parts that cover the dataset, one per shard
    parts = [set(d.result.result["sample_ids"]) for d in docs]
    assert not parts[0] & parts[1]
    assert parts[0] | parts[1] == set(dataset.values("id"))

    # Equal to the single-worker index
    bl.build_similarity_index(dataset, brain_key="single", progress=False,
                              **model)
    ids = dataset.values("id")
    sharded = dataset.load_brain_results("sharded", cache=False)
    single = dataset.load_brain_results("single", cache=False)
    emb_sharded, ids_sharded, _ = sharded.get_embeddings(sample_ids=ids)
    emb_single, ids_single, _ = single.get_embeddings(sample_ids=ids)
    assert list(ids_sharded) == list(ids_single) == ids
    assert np.allclose(emb_sharded, emb_single, atol=1e-3)
    for text in ("a photo of a red star", "a photo of a green square"):
        assert bl.find_similar(dataset, text=text, k=5,
                               brain_key="sharded").values("id") == \
            bl.find_similar(dataset, text=text, k=5,
                            brain_key="single").values("id")


def _shard_builds(dataset, brain_key=None):
    """The dataset's sharded builds, oldest first, and how many staged
    documents they left."""
    from bulk_labeling.core import sharding

    query = {"dataset_id": dataset._doc.id}
    if brain_key:
        query["brain_key"] = brain_key
    builds = list(db.get_db()[sharding.BUILDS_COLLECTION].find(query).sort(
        "created_at", 1))
    staged = db.get_db()[sharding.STAGING_COLLECTION].count_documents(
        {"build_id": {"$in": [b["_id"] for b in builds]}})
    return builds, staged


@pytest.mark.parametrize("num_shards", [0, -2, 11, 2.5, "2", True, None])
def test_sharded_build_rejects_bad_num_shards(dataset, num_shards):
    _, model = _tiny_clip()
    insert_bare_samples(dataset, 10)
    with pytest.raises(bl.BulkLabelingError, match="num_shards"):
        bl.build_similarity_index(dataset, brain_key="bad", progress=False,
                                  num_shards=num_shards, **model)
    assert dataset.list_brain_runs() == []
    assert _shard_builds(dataset) == ([], 0)


def test_sharded_build_operators_reject_bad_input(dataset):
    _, model = _tiny_clip()
    insert_bare_samples(dataset, 10)
    for value in ("abc", 2.5, 0, 11):
        with pytest.raises(Exception, match="num_shards"):
            run_operator("build_similarity_index", dataset=dataset,
                         params=dict(model, num_shards=value))
    with pytest.raises(Exception, match="not a valid id"):
        run_operator("build_similarity_index_shard", dataset=dataset,
                     params={"build_id": "nope", "shard": 0})
    with pytest.raises(Exception, match="has no sharded build"):
        run_operator("build_similarity_index_shard", dataset=dataset,
                     params={"build_id": str(ObjectId()), "shard": 0})
    assert dataset.list_brain_runs() == []
    assert _shard_builds(dataset) == ([], 0)


def _same_index(dataset, key, reference):
    """Asserts that two indexes hold the same vectors of the same samples
    and rank text queries alike."""
    ids = dataset.values("id")
    got, ref = [dataset.load_brain_results(k, cache=False).get_embeddings(
        sample_ids=ids)[:2] for k in (key, reference)]
    assert list(got[1]) == list(ref[1]) == ids
    assert np.allclose(got[0], ref[0], atol=1e-3)
    for text in ("a photo of a blue circle", "a photo of a red star"):
        ranked = [bl.find_similar(dataset, text=text, k=4,
                                  brain_key=k).values("id")
                  for k in (key, reference)]
        assert ranked[0] == ranked[1], text


def test_sharded_build_without_delegation_runs_inline(dataset, tmp_path):
    """Not delegated, the shards run one after another in the caller and
    give the single-run index; a second build only embeds what is new."""
    trainer, model = _tiny_clip()
    items = trainer.write_held_out(tmp_path / "shapes", per_class=1, seed=7)
    dataset.add_samples([fo.Sample(filepath=p) for p, _ in items[:20]])

    result = run_operator("build_similarity_index", dataset=dataset,
                          params=dict(model, brain_key="inline", num_shards=3))
    assert result["num_shards"] == 3 and result["shard_operations"] == []
    assert result["indexed"] == result["added"] == 20
    builds, staged = _shard_builds(dataset)
    assert [b["state"] for b in builds] == ["completed"] and staged == 0
    assert [s["size"] for s in builds[0]["shards"]] == [7, 7, 6]
    bl.build_similarity_index(dataset, brain_key="single", progress=False,
                              **model)
    _same_index(dataset, "inline", "single")

    # A finished shard cannot run again
    with pytest.raises(Exception, match="completed"):
        run_operator("build_similarity_index_shard", dataset=dataset,
                     params={"build_id": result["build_id"], "shard": 0})

    dataset.add_samples([fo.Sample(filepath=p) for p, _ in items[20:]])
    dataset.delete_samples(dataset.first())
    result = bl.build_similarity_index(dataset, brain_key="inline",
                                       num_shards=2, progress=False, **model)
    assert (result["added"], result["removed"], result["indexed"]) == (
        len(items) - 20, 1, len(items) - 1)
    assert not result["created"]
    bl.update_similarity_index(dataset, brain_key="single", progress=False)
    _same_index(dataset, "inline", "single")


def test_one_sharded_build_at_a_time_per_index(dataset, tmp_path):
    from bulk_labeling.core import similarity as sim

    trainer, model = _tiny_clip()
    items = trainer.write_held_out(tmp_path / "shapes", per_class=1, seed=3)
    dataset.add_samples([fo.Sample(filepath=p) for p, _ in items[:6]])

    steps = sim.iter_build_index(dataset, brain_key="locked", num_shards=2,
                                 **model)
    while not next(steps).label.startswith("Loading model"):
        pass
    with pytest.raises(bl.BulkLabelingError, match="already running"):
        bl.build_similarity_index(dataset, brain_key="locked", num_shards=2,
                                  progress=False, **model)
    # Another index of the dataset is not blocked
    bl.build_similarity_index(dataset, brain_key="other", num_shards=2,
                              progress=False, **model)

    # Interrupted: the build fails, drops its staging and leaves no index
    steps.close()
    builds, staged = _shard_builds(dataset, "locked")
    assert [b["state"] for b in builds] == ["failed"] and staged == 0
    assert "locked" not in dataset.list_brain_runs()

    result = bl.build_similarity_index(dataset, brain_key="locked",
                                       num_shards=2, progress=False, **model)
    assert result["indexed"] == 6
