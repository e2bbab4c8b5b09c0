"""Scalable similarity backends of fiftyone-brain, end to end on this
machine: LanceDB (an embedded library from PyPI, no server) besides the
default sklearn index.

Build, query (by vector and by sample id, checked against an exact numpy
search and against the sklearn backend), incremental add and delete, and a
reload of the index from the dataset in a fresh state.
"""

import numpy as np
import pytest

import fiftyone as fo

pytest.importorskip("lancedb")

import fiftyone.brain as fob  # noqa: E402

DIM = 16
COUNT = 300


@pytest.fixture
def lancedb_uri(tmp_path, monkeypatch):
    """A LanceDB folder of the test's own, set the way a team sets it: in the
    brain config (``FIFTYONE_BRAIN_SIMILARITY_LANCEDB_URI`` or
    ``brain_config.json``), so that every process that loads the index finds
    the same tables."""
    uri = str(tmp_path / "lancedb")
    backends = fob.brain_config.similarity_backends
    monkeypatch.setitem(backends, "lancedb", dict(backends["lancedb"], uri=uri))
    return uri


@pytest.fixture
def vectors():
    rng = np.random.default_rng(7)
    return rng.normal(size=(COUNT, DIM)).astype(np.float32)


def _samples(dataset, count):
    dataset.add_samples(
        [fo.Sample(filepath="/data/vec%05d.jpg" % i) for i in range(count)]
    )
    return dataset.values("id")


def _exact_top(vectors, ids, query, k):
    """Ids of the k nearest by cosine similarity, by brute force."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = query / np.linalg.norm(query)
    scores = unit @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[i] for i in order], scores[order]


def test_lancedb_build_query_add_delete(dataset, vectors, lancedb_uri):
    ids = _samples(dataset, COUNT)
    first = COUNT - 50

    # Build from precomputed embeddings, on part of the dataset
    index = fob.compute_similarity(
        dataset.select(ids[:first]),
        embeddings=vectors[:first],
        backend="lancedb",
        brain_key="lance",
        metric="cosine",
    )
    assert index.config.method == "lancedb"
    assert index.total_index_size == first
    assert str(index.config.uri) == lancedb_uri
    assert index.config.table_name in index._db.table_names()

    # Query by vector: same ranking as an exact search
    query = vectors[5] + 0.1 * vectors[9]
    expected, _ = _exact_top(vectors[:first], ids[:first], query, 10)
    view = dataset.sort_by_similarity(query, k=10, brain_key="lance")
    assert view.values("id") == expected

    # Query by sample id: the sample itself comes first
    view = dataset.sort_by_similarity(ids[42], k=5, brain_key="lance")
    got = view.values("id")
    assert got[0] == ids[42]
    assert got == _exact_top(vectors[:first], ids[:first], vectors[42], 5)[0]

    # Nearest neighbours with distances, straight from the index
    nn_ids, _, dists = index._kneighbors(query=vectors[7], k=3,
                                         return_dists=True)
    assert nn_ids[0] == ids[7]
    assert dists[0] == pytest.approx(0.0, abs=1e-5)

    # Incremental add: the new samples are found
    index.add_to_index(vectors[first:], ids[first:])
    assert index.total_index_size == COUNT
    view = dataset.sort_by_similarity(vectors[COUNT - 1], k=1,
                                      brain_key="lance")
    assert view.values("id") == [ids[COUNT - 1]]
    expected, _ = _exact_top(vectors, ids, query, 10)
    assert dataset.sort_by_similarity(query, k=10,
                                      brain_key="lance").values("id") == expected

    # Replacing vectors: fiftyone-brain 0.25's LanceDB add_to_index appends
    # a second row for an id already in the table (its overwrite=True is a
    # no-op), so a replacement is a remove then an add
    index.remove_from_index(sample_ids=ids[:3])
    index.add_to_index(vectors[:3] * 2, ids[:3])
    assert index.total_index_size == COUNT
    emb, _, _ = index.get_embeddings(sample_ids=ids[:3])
    assert np.allclose(emb, vectors[:3] * 2)

    # Incremental delete: removed samples are never returned again
    removed = ids[:20]
    index.remove_from_index(sample_ids=removed)
    assert index.total_index_size == COUNT - 20
    got = dataset.sort_by_similarity(vectors[10], k=20,
                                     brain_key="lance").values("id")
    assert not set(got) & set(removed)
    assert got == _exact_top(vectors[20:], ids[20:], vectors[10], 20)[0]

    # Stored vectors come back as given
    emb, sids, _ = index.get_embeddings(sample_ids=ids[100:103])
    assert list(sids) == ids[100:103]
    assert np.allclose(emb, vectors[100:103])

    # Another process (or the App) loads the same index from the dataset
    # and the shared LanceDB uri
    reloaded = fo.load_dataset(dataset.name).load_brain_results(
        "lance", cache=False)
    assert reloaded.total_index_size == COUNT - 20
    assert dataset.sort_by_similarity(
        query, k=10, brain_key="lance").values("id") == _exact_top(
            vectors[20:], ids[20:], query, 10)[0]

    # Deleting an index: cleanup() drops the table (delete_brain_run alone
    # leaves it behind in the backend)
    table = index.config.table_name
    reloaded.cleanup()
    dataset.delete_brain_run("lance")
    import lancedb

    assert table not in lancedb.connect(lancedb_uri).table_names()


def test_lancedb_matches_sklearn(dataset, vectors, lancedb_uri):
    ids = _samples(dataset, COUNT)
    fob.compute_similarity(dataset, embeddings=vectors, backend="sklearn",
                           brain_key="sk", metric="cosine")
    fob.compute_similarity(dataset, embeddings=vectors, backend="lancedb",
                           brain_key="lance", metric="cosine")
    rng = np.random.default_rng(3)
    for query in rng.normal(size=(5, DIM)).astype(np.float32):
        sk = dataset.sort_by_similarity(query, k=25, brain_key="sk")
        lance = dataset.sort_by_similarity(query, k=25, brain_key="lance")
        assert lance.values("id") == sk.values("id")

    # A view restricts the candidates the same way for both
    view = dataset.select(ids[::2])
    sk = view.sort_by_similarity(vectors[4], k=10, brain_key="sk")
    lance = view.sort_by_similarity(vectors[4], k=10, brain_key="lance")
    assert lance.values("id") == sk.values("id")
    assert set(lance.values("id")) <= set(ids[::2])


# --------------------------------------------------- through the plugin


def _load_trainer():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location(
        "train_tiny_clip", REPO / "scripts" / "train_tiny_clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trainer():
    return _load_trainer()


@pytest.fixture(scope="module")
def tiny_model(trainer):
    """``(checkpoint, config)`` of the tiny CLIP of the smart-search tests
    (trained once, offline, if missing)."""
    ckpt, config = trainer.ensure_model()
    return str(ckpt), str(config)


def _model_kwargs(tiny_model):
    ckpt, config = tiny_model
    return {"model": "bl-tiny-clip", "pretrained": ckpt,
            "model_config": config}


def _add_renders(dataset, trainer, folder, per_class, seed):
    items = trainer.write_held_out(folder, per_class=per_class, seed=seed)
    dataset.add_samples([fo.Sample(filepath=p, gt=fo.Classification(label=l))
                         for p, l in items])
    return items


def test_plugin_index_on_lancedb(dataset, tiny_model, trainer, tmp_path,
                                 lancedb_uri):
    import bulk_labeling as bl
    from bulk_labeling.core import similarity as sim

    from conftest import run_operator

    _add_renders(dataset, trainer, tmp_path / "a", per_class=2, seed=4242)
    count = dataset.count()

    # Build through the operator, on LanceDB
    result = run_operator("build_similarity_index", dataset=dataset,
                          params=dict(_model_kwargs(tiny_model),
                                      brain_key="lance", backend="lancedb"))
    assert result["indexed"] == count and result["added"] == count
    status = sim.index_status(dataset, "lance")
    assert status["backend"] == "lancedb"
    assert status["indexed"] == count and not status["stale"]

    # The same model on the default sklearn index, for reference
    bl.build_similarity_index(dataset, brain_key="sk", backend="sklearn",
                              progress=False, **_model_kwargs(tiny_model))

    # Text and sample queries rank like the sklearn index
    for text in ("a photo of a red star", "a photo of a blue circle"):
        lance = bl.find_similar(dataset, text=text, k=5, brain_key="lance")
        sk = bl.find_similar(dataset, text=text, k=5, brain_key="sk")
        assert lance.values("id") == sk.values("id")
        assert np.allclose(lance.values("similarity"),
                           sk.values("similarity"), atol=1e-3)
    query_id = dataset.first().id
    lance = bl.find_similar(dataset, ids=[query_id], k=5, brain_key="lance")
    sk = bl.find_similar(dataset, ids=[query_id], k=5, brain_key="sk")
    assert lance.values("id") == sk.values("id")

    # Incremental add: only the new samples are embedded
    new = _add_renders(dataset, trainer, tmp_path / "b", per_class=1,
                       seed=777)
    update = bl.update_similarity_index(dataset, brain_key="lance",
                                        progress=False)
    assert update["added"] == len(new)
    assert update["indexed"] == count + len(new)
    new_id = dataset.match(fo.ViewField("filepath") == new[0][0]).first().id
    assert bl.find_similar(dataset, ids=[new_id], k=1,
                           brain_key="lance").values("id") == [new_id]

    # Incremental delete: deleted samples leave the index
    deleted = dataset.limit(10).values("id")
    dataset.delete_samples(deleted)
    update = bl.update_similarity_index(dataset, brain_key="lance",
                                        progress=False)
    assert update["removed"] == 10
    assert update["indexed"] == dataset.count()
    assert sim.index_status(dataset, "lance")["indexed"] == dataset.count()
    found = bl.find_similar(dataset, text="a photo of a red star", k=50,
                            brain_key="lance").values("id")
    assert not set(found) & set(deleted)
