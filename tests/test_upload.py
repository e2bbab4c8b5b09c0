"""Upload with concepts: real photos, a real mongod, FiftyOne's real
executor."""

import base64
import io
import os
import re
import shutil

import pytest
from PIL import Image

import fiftyone as fo

import bulk_labeling as bl
from bulk_labeling import demo_data
from bulk_labeling.core import history
from bulk_labeling.core import metadata as meta
from bulk_labeling.core import upload as up
from bulk_labeling.core.errors import BulkLabelingError

from conftest import run_operator

SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


@pytest.fixture(scope="module")
def photos():
    found = demo_data.export_photos()
    assert len(found) >= 12, "the offline photos are missing"
    return [p for p, _ in found]


@pytest.fixture(scope="module")
def tree(tmp_path_factory, photos):
    """root/: 4 JPEGs, sub/ 2 PNGs, sub/deeper/ 1 JPEG, a truncated JPEG, a
    PNG with a garbled header, a text file and a hidden file; other/: 2 JPEGs
    and a PNG for globs."""
    base = tmp_path_factory.mktemp("upload_tree")
    root = base / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    other = base / "other"
    other.mkdir()

    for i, src in enumerate(photos[:4]):
        shutil.copy(src, root / ("photo%d.jpg" % i))
    for i, src in enumerate(photos[4:6]):
        with Image.open(src) as img:
            img.save(root / "sub" / ("image%d.png" % i))
    shutil.copy(photos[6], root / "sub" / "deeper" / "deep.jpg")

    data = open(photos[7], "rb").read()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    png = io.BytesIO()
    with Image.open(photos[8]) as img:
        img.save(png, format="PNG")
    (root / "garbled.png").write_bytes(b"\x00" * 16 + png.getvalue()[16:])
    (root / "notes.txt").write_text("not an image\n" * 10)
    (root / ".hidden.jpg").write_bytes(data)

    shutil.copy(photos[9], other / "a.jpg")
    shutil.copy(photos[10], other / "b.jpg")
    with Image.open(photos[11]) as img:
        img.save(other / "c.png")

    return {"base": base, "root": root, "other": other}


@pytest.fixture
def media_root(tmp_path, monkeypatch):
    """FiftyOne's default dataset dir, pointed at a temp folder."""
    path = tmp_path / "fiftyone_home"
    monkeypatch.setattr(fo.config, "default_dataset_dir", str(path))
    return path


def _b64(path, fmt=None):
    if fmt is None:
        return base64.b64encode(open(path, "rb").read()).decode()
    buf = io.BytesIO()
    with Image.open(path) as img:
        img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _files_under(path):
    return sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
    )


def _snapshot(dataset, *dirs):
    return (
        dataset.count(),
        sorted(dataset.get_field_schema()),
        dict(dataset.classes),
        len(history.list_operations(dataset, limit=0)),
        [_files_under(d) for d in dirs],
    )


def _reasons(result):
    return {os.path.basename(s["path"]): s["reason"] for s in result["skipped"]}


def test_folder_with_concepts_and_metadata(dataset, tree):
    payload = {"source": "camera-3", "batch": 7, "tags": {"site": "north"}}
    result = bl.upload(
        dataset, str(tree["root"]), concepts=["cat", "pet"], metadata=payload
    )

    assert result["added"] == 7
    reasons = _reasons(result)
    assert set(reasons) == {"truncated.jpg", "garbled.png", "notes.txt"}
    assert reasons["truncated.jpg"].startswith("corrupt image")
    assert reasons["garbled.png"].startswith("corrupt image")
    assert reasons["notes.txt"] == "not an image file"
    for skipped in result["skipped"]:
        assert os.path.isabs(skipped["path"])

    # Concepts, metadata and media metadata on every new sample
    assert dataset.count() == 7
    assert dataset.media_type == "image"
    assert bl.get_vocabulary(dataset) == ["cat", "pet"]
    assert dataset.count_values("concepts.classifications.label") == {
        "cat": 7, "pet": 7}
    label_ids = dataset.values("concepts.classifications.id", unwind=True)
    assert len(set(label_ids)) == 14
    stored = dataset.values("custom_metadata", _raw=True)
    assert [meta.user_document(d) for d in stored] == [payload] * 7
    assert dataset.get_field("custom_metadata.source") is not None
    assert dataset.count_values("custom_metadata.source") == {"camera-3": 7}
    assert set(dataset.distinct("metadata.mime_type")) == {
        "image/jpeg", "image/png"}
    for sample in dataset:
        with Image.open(sample.filepath) as img:
            assert (sample.metadata.width, sample.metadata.height) == img.size
        assert sample.metadata.size_bytes == os.path.getsize(sample.filepath)
        assert sample.metadata == fo.ImageMetadata.build_for(sample.filepath)
        assert sample.created_at is not None
        assert sample.last_modified_at is not None
    assert "photo0.jpg" in {os.path.basename(p) for p in dataset.values("filepath")}
    assert not any("hidden" in p for p in dataset.values("filepath"))

    # Nested folders were walked; FiftyOne sees a normal dataset
    assert any("/sub/deeper/" in p for p in dataset.values("filepath"))
    assert len(dataset.match(fo.ViewField("metadata.width") > 0)) == 7
    assert dataset.get_field("concepts.classifications.label") is not None

    # The new samples can be found from the operation id
    view = bl.uploaded_view(dataset, result["operation_id"])
    assert sorted(view.values("id")) == sorted(dataset.values("id"))
    op = history.list_operations(dataset, limit=1)[0]
    assert op["type"] == "upload" and op["status"] == "applied"
    assert op["matched"] == 7 and op["changed"] == 7

    # Re-uploading the same folder adds nothing and reports every file
    again = bl.upload(dataset, str(tree["root"]), concepts=["cat"])
    assert again["added"] == 0 and again["operation_id"] is None
    assert sum(r == "already in the dataset" for r in _reasons(again).values()) == 7
    assert dataset.count() == 7


def test_globs_recursion_and_missing_paths(dataset, tree):
    result = bl.upload(
        dataset,
        [
            str(tree["other"] / "*.jpg"),
            str(tree["root"] / "**" / "*.png"),
            str(tree["base"] / "nope" / "*.jpg"),
            str(tree["base"] / "missing.jpg"),
            str(tree["other"] / "a.jpg"),  # listed twice: added once
        ],
        concepts="glob",
    )
    names = sorted(os.path.basename(p) for p in dataset.values("filepath"))
    assert names == ["a.jpg", "b.jpg", "image0.png", "image1.png"]
    assert result["added"] == 4
    reasons = _reasons(result)
    assert reasons["*.jpg"] == "no file matches this pattern"
    assert reasons["missing.jpg"] == "file not found"
    assert reasons["garbled.png"].startswith("corrupt image")

    flat = fo.Dataset()
    try:
        result = bl.upload(flat, str(tree["root"]), recursive=False)
        names = {os.path.basename(p) for p in flat.values("filepath")}
        assert names == {"photo0.jpg", "photo1.jpg", "photo2.jpg", "photo3.jpg"}
        assert "concepts" not in flat.get_field_schema()
        assert "custom_metadata" not in flat.get_field_schema()
    finally:
        flat.delete()


def test_skip_existing_false_adds_again(dataset, tree):
    path = str(tree["other"] / "a.jpg")
    bl.upload(dataset, path)
    result = bl.upload(dataset, path, skip_existing=False)
    assert result["added"] == 1
    assert dataset.count() == 2


def test_browser_files_are_stored_safely(dataset, tree, tmp_path, photos):
    media_dir = tmp_path / "area" / "media"
    before = _files_under(tmp_path)
    jpg = _b64(photos[0])
    files = [
        {"name": "../../x.png", "content": _b64(photos[1], "PNG")},
        {"name": "holiday photo.jpg", "content": "data:image/jpeg;base64," + jpg},
        {"name": "holiday photo.jpg", "content": jpg, "type": "image/jpeg",
         "size": 1, "last_modified": 0},
        {"file": {"name": "C:\\Users\\me\\..\\cat.jpeg", "content": jpg}},
        {"name": "..", "content": jpg},
        {"name": "notes.txt", "content": base64.b64encode(b"hello").decode()},
        {"name": "broken.jpg", "content": "!!! not base64 !!!"},
    ]
    result = bl.upload(dataset, files=files, concepts=["uploaded"],
                       media_dir=str(media_dir))

    assert result["added"] == 5
    assert result["media_dir"] == str(media_dir)
    reasons = _reasons(result)
    assert reasons == {
        "notes.txt": "not an image file",
        "broken.jpg": "content is not valid base64",
    }

    # Nothing outside media_dir; every stored name is safe and unique
    written = _files_under(media_dir)
    assert sorted(set(_files_under(tmp_path)) - set(before)) == written
    assert not (tmp_path / "x.png").exists()
    assert not (tmp_path / "area" / "x.png").exists()
    filepaths = dataset.values("filepath")
    assert sorted(filepaths) == written
    names = [os.path.basename(p) for p in filepaths]
    assert len(set(names)) == 5
    for name in names:
        assert SAFE_NAME.match(name) and ".." not in name.split(".")[0]
    assert "x.png" in names
    assert "cat.jpeg" in names
    assert "holiday_photo.jpg" in names
    assert sum(n.startswith("holiday_photo") for n in names) == 2
    assert open(str(media_dir / "x.png"), "rb").read().startswith(b"\x89PNG")
    assert dataset.count_values("concepts.classifications.label") == {
        "uploaded": 5}

    # An existing name is never overwritten
    again = bl.upload(dataset, files=files[:1], media_dir=str(media_dir))
    assert again["added"] == 1
    assert len(_files_under(media_dir)) == 6


def test_safe_name():
    assert up.safe_name("../../x.png", "PNG") == "x.png"
    assert up.safe_name("..", "JPEG") == "upload.jpg"
    assert up.safe_name("/etc/passwd", "PNG") == "passwd.png"
    assert up.safe_name("shot.txt", "PNG") == "shot_txt.png"
    assert up.safe_name("Été à Paris.JPG", "JPEG") == "Ete_a_Paris.jpg"
    assert up.safe_name(".bashrc", "PNG") == "bashrc.png"
    assert len(up.safe_name("a" * 500 + ".png", "PNG")) <= 110


def test_rejected_calls_write_nothing(dataset, tree, tmp_path, photos):
    media_dir = tmp_path / "media"
    bl.upload(dataset, str(tree["other"] / "a.jpg"))
    before = _snapshot(dataset, tmp_path)
    good = [{"name": "ok.jpg", "content": _b64(photos[0])}]
    bad_calls = [
        dict(paths=str(tree["root"]), concepts=[""]),
        dict(paths=str(tree["root"]), concepts=["ok", 3]),
        dict(paths=str(tree["root"]), metadata='{"$set": 1}'),
        dict(paths=str(tree["root"]), metadata="[1, 2]"),
        dict(paths=str(tree["root"]), metadata="{not json"),
        dict(paths=str(tree["root"]), metadata={"a": 1}, metadata_field="metadata"),
        dict(paths=str(tree["root"]), field="filepath", concepts=["x"]),
        dict(paths=[3]),
        dict(),
        dict(files=good, max_file_bytes=100),
        dict(files=good * 3, max_total_bytes=len(base64.b64decode(good[0]["content"])) * 2),
        dict(files=[{"name": "x.jpg"}]),
        dict(files=["not", 42]),
    ]
    for kwargs in bad_calls:
        with pytest.raises(BulkLabelingError):
            bl.upload(dataset, media_dir=str(media_dir), **kwargs)
        assert _snapshot(dataset, tmp_path) == before, kwargs

    # A dry run checks everything and writes nothing either
    result = bl.upload(dataset, str(tree["root"]), files=good,
                       concepts=["new"], media_dir=str(media_dir), dry_run=True)
    assert result["dry_run"] and result["added"] == 8
    assert _snapshot(dataset, tmp_path) == before

    # Every file skipped is not an error, and writes nothing
    result = bl.upload(dataset, str(tree["root"] / "notes.txt"), concepts=["new"])
    assert result["added"] == 0 and result["operation_id"] is None
    assert _reasons(result) == {"notes.txt": "not an image file"}
    assert _snapshot(dataset, tmp_path) == before


def test_metadata_schema_and_field_type_are_enforced(dataset, tree):
    bl.upload(dataset, str(tree["other"] / "a.jpg"))
    meta.set_metadata_schema(dataset, {
        "type": "object",
        "required": ["source"],
        "properties": {"source": {"type": "string"}},
    })
    before = _snapshot(dataset)
    for bad in ({"batch": 1}, {"source": 3}):
        with pytest.raises(BulkLabelingError, match="JSON Schema"):
            bl.upload(dataset, str(tree["root"]), concepts=["x"], metadata=bad)
        assert _snapshot(dataset) == before

    result = bl.upload(dataset, str(tree["root"]), metadata={"source": "ok"})
    assert result["added"] == 7

    other = fo.Dataset()
    try:
        other.add_sample_field("notes", fo.StringField)
        with pytest.raises(BulkLabelingError, match="not a custom metadata"):
            bl.upload(other, str(tree["root"]), concepts=["x"],
                      metadata={"a": 1}, metadata_field="notes")
        assert other.count() == 0 and "concepts" not in other.get_field_schema()
    finally:
        other.delete()


def test_video_dataset_is_rejected(tree):
    videos = fo.Dataset()
    try:
        videos.add_sample(fo.Sample(filepath="/data/clip.mp4"))
        with pytest.raises(BulkLabelingError, match="images"):
            bl.upload(videos, str(tree["root"]))
        assert videos.count() == 1
    finally:
        videos.delete()


def test_undo_removes_the_uploaded_samples(dataset, tree):
    bl.upload(dataset, str(tree["other"] / "a.jpg"), concepts=["keep"])
    result = bl.upload(dataset, str(tree["root"]), concepts=["cat"])
    assert dataset.count() == 8

    undone = bl.undo(dataset)
    assert undone["undone"] == result["operation_id"]
    assert undone["changed"] == 7
    assert dataset.count() == 1
    assert len(bl.uploaded_view(dataset, result["operation_id"])) == 0
    # Files on the server are left alone
    assert os.path.exists(tree["root"] / "photo0.jpg")


def test_crash_mid_insert_stays_pending_and_undo_cleans_up(
        dataset, tree, monkeypatch):
    monkeypatch.setattr(up, "INSERT_BATCH_SIZE", 3)
    steps = up.iter_upload(dataset, paths=str(tree["root"]), concepts=["cat"])
    for event in steps:
        if event.label.startswith("Adding samples"):
            break
    # The process "dies" after the first insert of 3 samples
    steps.close()

    assert dataset.count() == 3
    (pending,) = bl.pending(dataset)
    assert pending["type"] == "upload"
    with pytest.raises(BulkLabelingError, match="cannot be resumed"):
        bl.resume(dataset, pending["operation_id"])

    # The targets were stored before the insert: all 7 are known
    ids = up.uploaded_sample_ids(dataset, pending["operation_id"])
    assert len(ids) == 7

    result = bl.undo(dataset, pending["operation_id"])
    assert result["changed"] == 3 and result["num_conflicts"] == 0
    assert dataset.count() == 0
    assert bl.pending(dataset) == []

    # Uploading again now adds everything
    assert bl.upload(dataset, str(tree["root"]))["added"] == 7


def test_operator_with_files_and_paths(dataset, tree, media_root, photos):
    params = {
        "files": [
            {"name": "../../x.png", "type": "image/png", "size": 10,
             "last_modified": 0, "content": _b64(photos[2], "PNG")},
        ],
        "paths": [str(tree["other"] / "*.jpg")],
        "directory": {"absolute_path": str(tree["root"]),
                      "name": "root", "type": "directory"},
        "concepts": ["dog", "outdoor"],
        "metadata": '{"camera": "north", "n": 2}',
        "skip_existing": True,
    }
    result = run_operator("upload_with_concepts", dataset=dataset, params=params)

    assert result["added"] == 1 + 2 + 7
    assert {os.path.basename(s["path"]) for s in result["skipped"]} == {
        "truncated.jpg", "garbled.png", "notes.txt"}
    media_dir = up.default_media_dir(dataset)
    assert media_dir.startswith(str(media_root))
    assert _files_under(media_dir) == [os.path.join(media_dir, "x.png")]
    assert _files_under(media_root) == [os.path.join(media_dir, "x.png")]
    assert dataset.count_values("concepts.classifications.label") == {
        "dog": 10, "outdoor": 10}
    assert dataset.distinct("custom_metadata.camera") == ["north"]
    view = bl.uploaded_view(dataset, result["operation_id"])
    assert len(view) == 10

    # A bad call through the operator is an error, and writes nothing
    count = dataset.count()
    with pytest.raises(Exception):
        run_operator("upload_with_concepts", dataset=dataset,
                     params=dict(params, metadata="[1]"))
    assert dataset.count() == count


def test_browser_files_that_arrive_empty_are_reported(dataset, media_root, photos):
    one = {"name": "one.png", "type": "image/png", "size": 10,
           "last_modified": 0, "content": _b64(photos[2], "PNG")}
    result = run_operator("upload_with_concepts", dataset=dataset,
                          params={"files": [one, None], "concepts": ["cat"]})
    assert result["added"] == 1
    assert [s["reason"] for s in result["skipped"]] == [
        "1 file(s) listed in the form arrived without content (the browser "
        "was still reading them): add them again"]

    # Nothing arrived at all: a clear error, nothing written
    count = dataset.count()
    with pytest.raises(Exception, match="arrived without content"):
        run_operator("upload_with_concepts", dataset=dataset,
                     params={"files": [None, None], "concepts": ["cat"]})
    assert dataset.count() == count


def test_operator_form_placement_and_delegation(dataset, tree):
    import asyncio

    from fiftyone.operators import executor
    from fiftyone.operators.registry import OperatorRegistry

    from conftest import uri

    registry = OperatorRegistry()
    name = uri("upload_with_concepts")
    bl.create_concepts(dataset, ["cat", "dog"])
    bl.upload(dataset, str(tree["other"] / "a.jpg"))
    request = {"dataset_name": dataset.name,
               "params": {"paths": [str(tree["root"])], "concepts": ["cat"]}}

    inputs = asyncio.run(executor.resolve_type(registry, name, request))
    assert not isinstance(inputs, executor.ExecutionResult), inputs.error
    form = inputs.to_json()
    props = form["type"]["properties"]
    assert props["files"]["view"]["items"]["name"] == "FileView"
    assert props["files"]["type"]["element_type"]["name"] == "UploadedFile"
    assert props["metadata"]["view"]["name"] == "TextFieldView"
    assert props["metadata"]["view"]["multiline"]
    assert props["directory"]["view"]["name"] == "FileExplorerView"
    choices = [c["value"] for c in props["concepts"]["view"]["choices"]]
    assert choices == ["cat", "dog"]

    outputs = asyncio.run(executor.resolve_type(
        registry, name, dict(request, target="outputs")))
    assert "skipped" in outputs.to_json()["type"]["properties"]

    placement = executor.resolve_placement(registry.get_operator(name), request)
    assert placement.to_json()["view"]["label"] == "Upload with concepts"

    # Server paths may be delegated; browser files always run right away
    options = asyncio.run(executor.resolve_execution_options(
        registry, name, request))
    assert options.allow_delegated_execution
    with_files = {"dataset_name": dataset.name,
                  "params": {"files": [{"name": "a.jpg", "content": "eA=="}]}}
    options = asyncio.run(executor.resolve_execution_options(
        registry, name, with_files))
    assert not options.allow_delegated_execution
    assert options.allow_immediate_execution


def test_progress_is_monotonic_and_bytes_are_accepted(dataset, tree, tmp_path,
                                                       photos):
    events = []
    raw = open(photos[3], "rb").read()
    result = bl.upload(
        dataset, str(tree["root"]), files=[("raw.jpg", raw)],
        media_dir=str(tmp_path / "media"), progress=events.append,
    )
    assert result["added"] == 8
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {e.label for e in events} == {
        "Checking files (step 1 of 2)", "Adding samples (step 2 of 2)"}
    assert open(str(tmp_path / "media" / "raw.jpg"), "rb").read() == raw


def test_a_similarity_index_is_told_about_the_new_samples(dataset, tree):
    import numpy as np
    import fiftyone.brain as fob

    bl.upload(dataset, str(tree["other"]))
    fob.compute_similarity(
        dataset, embeddings=np.random.default_rng(0).random((3, 8)),
        brain_key="sim", backend="sklearn", progress=False,
    )
    result = bl.upload(dataset, str(tree["root"]))
    assert result["added"] == 7
    # This index has no model the plugin can run, so it is reported stale,
    # with how to update it
    assert "'sim' is stale" in result["index"]
    assert "7 sample(s) are not in it" in result["index"]
