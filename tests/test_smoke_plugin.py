"""The plugin registers cleanly and its operators run through FiftyOne's real
executor."""

from fiftyone.operators.registry import OperatorRegistry

from conftest import make_samples, run_operator, PLUGIN


def test_plugin_registers_every_operator_without_errors():
    import yaml

    from conftest import REPO

    registry = OperatorRegistry()
    assert registry.list_errors() == []
    uris = {op.uri for op in registry.list_operators()}
    manifest = yaml.safe_load((REPO / "fiftyone.yml").read_text())
    listed = manifest["operators"] + manifest["panels"]
    # an operator missing from the manifest is silently not registered
    assert {"%s/%s" % (PLUGIN, name) for name in listed} <= uris
    assert {u for u in uris if u.startswith(PLUGIN + "/")} == {
        "%s/%s" % (PLUGIN, name) for name in listed}


def test_label_as_through_execute_operator(dataset):
    ids = make_samples(dataset, 6)
    result = run_operator("label_as", dataset=dataset, selected=ids[:3],
                          params={"concepts": ["cat"]})
    assert result["matched"] == 3 and result["changed"] == 3
    assert dataset.count_values("concepts.classifications.label") == {"cat": 3}
