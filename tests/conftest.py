"""Test isolation: a database, a plugins dir and settings of the tests' own.

These are set before fiftyone is imported. The tests run against a real
mongod: FiftyOne's embedded one under a temporary directory, or the server
named by ``FIFTYONE_DATABASE_URI`` (in a database of the tests' own).
"""

import os
import pathlib
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
_TMP = pathlib.Path(tempfile.mkdtemp(prefix="bulk_labeling_tests_"))

_plugins_dir = _TMP / "plugins"
_plugins_dir.mkdir()
(_plugins_dir / "bulk_labeling").symlink_to(REPO, target_is_directory=True)

os.environ["FIFTYONE_PLUGINS_DIR"] = str(_plugins_dir)
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
os.environ["FIFTYONE_SHOW_PROGRESS_BARS"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("FIFTYONE_DATABASE_NAME", "bulk_labeling_tests")
os.environ.setdefault("FIFTYONE_DEFAULT_DATASET_DIR", str(_TMP / "datasets"))

import private_mongod  # noqa: E402

private_mongod.isolate(_TMP)

import pytest  # noqa: E402

import fiftyone as fo  # noqa: E402
import fiftyone.operators as foo  # noqa: E402

from bulk_labeling.testing import insert_bare_samples  # noqa: E402,F401

PLUGIN = "@bulk-labeling/bulk_labeling"


def uri(name):
    return "%s/%s" % (PLUGIN, name)


def run_operator(name, dataset=None, view=None, selected=None, params=None,
                 **ctx):
    """Runs one of the plugin's operators through FiftyOne's real executor
    and returns its result, raising on error."""
    request = dict(ctx)
    if view is not None:
        request["view"] = view
    if dataset is not None:
        request["dataset"] = dataset
    if selected is not None:
        request["selected"] = [str(s) for s in selected]
    request["params"] = params or {}
    result = foo.execute_operator(uri(name), ctx=request)
    result.raise_exceptions()
    return result.result


@pytest.fixture
def dataset():
    ds = fo.Dataset()
    yield ds
    ds.delete()


def make_samples(dataset, count, prefix="/data/img"):
    dataset.add_samples(
        [fo.Sample(filepath="%s%06d.jpg" % (prefix, i)) for i in range(count)]
    )
    return dataset.values("id")

