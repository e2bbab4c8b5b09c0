"""Helpers shared by the test suite and the benchmark scripts."""

import datetime
import random

from bson import ObjectId


def insert_bare_samples(dataset, count, prefix="/data/bulk", batch_size=50_000):
    """Inserts ``count`` bare image samples with raw ``insert_many`` calls.

    The documents are the ones FiftyOne's ``add_samples`` writes for a bare
    ``fo.Sample(filepath=...)``, minus its per-sample Python work, so scale
    tests and benchmarks set up a million samples in seconds.
    """
    coll = dataset._sample_collection
    now = datetime.datetime.utcnow().replace(microsecond=0)
    for start in range(0, count, batch_size):
        coll.insert_many(
            [
                {
                    "_id": ObjectId(),
                    "filepath": "%s/%08d.jpg" % (prefix, i),
                    "tags": [],
                    "_media_type": "image",
                    "_rand": random.random(),
                    "_dataset_id": dataset._doc.id,
                    "created_at": now,
                    "last_modified_at": now,
                }
                for i in range(start, min(count, start + batch_size))
            ],
            ordered=False,
        )
