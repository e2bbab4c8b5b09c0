"""End-to-end flows of the seed document in a real browser (see docs/APP.md).

Each test drives the FiftyOne App in Chromium, asserts what the database
holds afterwards, and saves screenshots under ``artifacts/e2e/``.
"""

import os
import re
import shutil

import pytest

import bulk_labeling as bl
from fiftyone import ViewField as F

from bulk_labeling.demo_data import export_photos

from .helpers import require_operator, tiny_clip, wait_until

pytestmark = pytest.mark.browser

FIELD = "concepts"


def concept_counts(dataset, field=FIELD):
    dataset.reload()
    if field not in dataset.get_field_schema():
        return {}
    counts = dataset.count_values("%s.classifications.label" % field)
    return {k: v for k, v in counts.items() if k is not None}


def labeled_ids(dataset, concept, field=FIELD):
    """The ids of the samples that hold ``concept``."""
    # the App's server process declared the field: this process must reload
    dataset.reload()
    if field not in dataset.get_field_schema():
        return set()
    return set(dataset.filter_labels(field, F("label") == concept).values("id"))


def test_select_range_and_label_as_from_the_grid(app, photo_dataset):
    ds = photo_dataset
    ids = ds.values("id")
    app.open(ds)

    # one click, then shift+click: the range in between is selected
    app.select(1)
    app.select(4, shift=True)
    wait_until(lambda: app.selection_count() == 4, message="4 selected")
    app.shot("01-range-selected")

    app.grid_action("label_as")
    app.wait_for_form("4 sample(s) targeted")
    app.fill_autocomplete("Type and press enter", ["songbird"])
    app.wait_for_form("4 will change")
    app.shot("01-label-as-form", doc_name="label_as_form")
    output = app.execute()
    assert "Samples changed" in output and "4" in output
    app.shot("01-label-as-result")
    app.close_output()

    wait_until(lambda: concept_counts(ds) == {"songbird": 4},
               message="4 songbird labels in the database")
    assert labeled_ids(ds, "songbird") == set(ids[1:5])

    # the grid draws the new labels
    wait_until(lambda: app.tags(FIELD).count("songbird") == 4,
               message="the grid to show 4 songbird tags")
    app.shot("01-labeled-grid", doc_name="label_as_grid")


def test_upload_files_with_concepts(app, photo_dataset, photos, tmp_path):
    require_operator("upload_with_concepts")
    ds = photo_dataset
    used = set(ds.values("filepath"))
    sources = [p for p, _ in export_photos() if p not in used][:2]
    files = []
    for i, src in enumerate(sources):
        dst = tmp_path / ("arrival_%d.jpg" % i)
        shutil.copyfile(src, dst)
        files.append(str(dst))

    app.open(ds)
    app.grid_action("upload_with_concepts")
    app.wait_for_form("No files from your computer")
    for i, path in enumerate(files):
        app.prompt.get_by_role(
            "button", name="Add files from your computer"
        ).click()
        app.prompt.locator('input[type="file"]').nth(i).set_input_files(path)
        app.prompt.get_by_text(os.path.basename(path)).first.wait_for()

    app.fill_autocomplete("Type and press enter", ["new-arrival"])
    app.wait_for_form("2 file(s)")
    app.shot("02-upload-form", doc_name="upload_form")
    output = app.execute(until="Samples added")
    assert re.search(r"Samples added:\s*2\b", output), output
    app.close_output()

    def uploaded():
        ds.reload()
        view = ds.match(F("filepath").re_match(r".*/arrival_\d\.jpg$"))
        return view if len(view) == 2 else None

    view = wait_until(uploaded, message="2 new samples in the database")
    for sample in view:
        assert _concepts_of(sample) == ["new-arrival"]

    # the operator shows the new batch in the grid, with its concepts
    wait_until(lambda: app.tags(FIELD).count("new-arrival") == 2,
               message="the grid to show the 2 uploads")
    app.shot("02-upload-grid", doc_name="upload_grid")


def test_invalid_metadata_json_shows_an_error_and_writes_nothing(
        app, photo_dataset):
    require_operator("edit_metadata")
    ds = photo_dataset
    ids = ds.values("id")
    app.open(ds)
    app.select(0)
    app.select(2, shift=True)
    wait_until(lambda: app.selection_count() == 3, message="3 selected")

    app.grid_action("edit_metadata")
    app.wait_for_form("3 sample(s) targeted")
    editor = app.metadata_editor()
    app.type_code(editor, '{"camera": "X100", "site": ')
    app.prompt.get_by_text("Metadata is not valid JSON").first.wait_for()
    app.shot("03-metadata-invalid", doc_name="metadata_invalid")

    execute = app.prompt.get_by_role("button", name="Execute", exact=True)
    if execute.is_enabled():
        execute.click()
        app.page.get_by_text("not valid JSON").last.wait_for()
    ds.reload()
    assert "custom_metadata" not in ds.get_field_schema() or not any(
        ds.values("custom_metadata")
    )

    # fixed, it applies to the 3 selected samples only
    app.type_code(editor, '{"camera": "X100", "site": {"row": 3}}')
    app.wait_for_form("3 will change")
    app.shot("03-metadata-valid", doc_name="metadata_form")
    app.execute()
    app.close_output()
    wait_until(
        lambda: ds.reload() or ds.match(F("custom_metadata.camera") == "X100")
        .values("id") == ids[:3],
        message="the metadata of the 3 selected samples",
    )
    assert ds.select(ids[:3]).values("custom_metadata.site.row") == [3, 3, 3]


def test_find_similar_from_a_sample_then_label_all_results(
        app, photo_dataset):
    require_operator("find_similar_to_sample")
    from bulk_labeling.core import similarity as sim

    ds = photo_dataset
    ckpt, config = tiny_clip()
    sim.build_similarity_index(ds, model="bl-tiny-clip", pretrained=ckpt,
                               model_config=config, progress=False)
    query = ds.first().id

    app.open(ds)
    panel = app.open_panel()

    # the magnifier on the sample being viewed
    app.open_sample(0)
    app.modal_action("find_similar")
    app.wait_for_form("keeps")
    app.set_text_input("Results (k)", "10")
    app.wait_for_form("keeps 10 of")
    app.shot("04-find-similar-form", doc_name="find_similar_form")
    app.execute()
    app.close_output()

    # the panel shows the results' scores; keep the top 4
    panel.get_by_text("Apply to all would label 10 samples").wait_for()
    app.set_panel_slider(4)
    panel.get_by_text("Apply to all would label 4 samples").wait_for()
    wait_until(lambda: app.entry_count() == 4, message="4 results in the grid")
    app.shot("04-smart-search-panel", doc_name="smart_search_panel")

    app.panel_button("Label 4 results as...").click()
    app.wait_for_form("4 sample(s) targeted")
    app.fill_autocomplete("Type and press enter", ["lookalike"])
    app.execute()
    app.close_output()

    expected = set(sim.search(ds, ids=[query], k=4)["ids"])
    wait_until(lambda: labeled_ids(ds, "lookalike") == expected,
               message="the 4 results labeled")
    app.shot("04-labeled-results", doc_name="smart_search_labeled")


def test_undo_from_the_panel_restores_the_prior_state(app, photo_dataset):
    ds = photo_dataset
    classes = ds.values("ground_truth.label")
    birds = ds.match(F("ground_truth.label") == "bird")
    bl.label(birds, add=["bird"])
    before = {s.id: _concepts_of(s) for s in ds}
    fish = [i for i, c in enumerate(classes) if c == "fish"][:2]

    app.open(ds)
    panel = app.open_panel()
    panel.get_by_text("0 selected").first.wait_for()

    # counts follow the selection live
    app.select(fish[0])
    app.select(fish[1])
    panel.get_by_text("2 selected").first.wait_for()
    panel.get_by_text("Add to the 2 selected samples").first.wait_for()

    # quick "Label as" button of the most used concept
    app.panel_button("+ bird").click()
    app.output_done.first.wait_for()
    app.close_output()
    wait_until(lambda: concept_counts(ds).get("bird") == len(birds) + 2,
               message="2 more birds in the database")
    panel.get_by_text("Label as +bird").first.wait_for()
    wait_until(lambda: app.tags(FIELD).count("bird") == len(birds) + 2,
               message="the grid to show the new bird labels")
    app.shot("05-panel", doc_name="panel")

    # Undo the latest operation from the History section
    app.panel_button("Undo").first.click()
    app.wait_for_form("Operation")
    app.shot("05-undo-form", doc_name="undo_form")
    app.execute()
    app.close_output()

    wait_until(lambda: {s.id: _concepts_of(s) for s in ds} == before,
               message="the prior state to be restored")
    panel.get_by_text("undone").first.wait_for()
    app.shot("05-panel-after-undo", doc_name="panel_after_undo")


def _concepts_of(sample, field=FIELD):
    value = sample[field] if sample.has_field(field) else None
    if value is None:
        return []
    return sorted(c.label for c in value.classifications)
