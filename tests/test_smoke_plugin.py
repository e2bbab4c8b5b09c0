"""The plugin registers cleanly and its operators run through FiftyOne's real
executor."""

from fiftyone.operators.registry import OperatorRegistry

from conftest import make_samples, run_operator, PLUGIN


def test_plugin_registers_every_operator_without_errors():
    registry = OperatorRegistry()
    assert registry.list_errors() == []
    uris = {op.uri for op in registry.list_operators()}
    for name in ("label_as", "manage_concepts", "bulk_history",
                 "undo_bulk_operation", "resume_bulk_operation"):
        assert "%s/%s" % (PLUGIN, name) in uris


def test_label_as_through_execute_operator(dataset):
    ids = make_samples(dataset, 6)
    result = run_operator("label_as", dataset=dataset, selected=ids[:3],
                          params={"concepts": ["cat"]})
    assert result["matched"] == 3 and result["changed"] == 3
    assert dataset.count_values("concepts.classifications.label") == {"cat": 3}
