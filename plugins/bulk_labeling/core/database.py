"""Low-level access to the MongoDB collections behind a FiftyOne dataset.

Everything that talks to pymongo directly lives in the core; this module holds
the pieces that several core modules share.
"""

import concurrent.futures
import datetime
import os

import fiftyone.core.dataset as fod
import fiftyone.core.odm as foo
import fiftyone.core.sample as fos
from bson import ObjectId
from bson.raw_bson import DEFAULT_RAW_BSON_OPTIONS

from .errors import BulkLabelingError
from .idbatch import IdBatch

#: Number of sample ids per bulk write. 100k ids keep each update command,
#: and each journal chunk that stores them, far below MongoDB's 16 MB limit
ID_BATCH_SIZE = 100_000

OPERATIONS_COLLECTION = "bulk_labeling.operations"
TARGETS_COLLECTION = "bulk_labeling.targets"
UNDO_COLLECTION = "bulk_labeling.undo"
STATE_COLLECTION = "bulk_labeling.state"


def get_db():
    """Returns the pymongo database that FiftyOne is connected to."""
    return foo.get_db_conn()


def sample_coll(sample_collection):
    """Returns the pymongo collection that stores the samples of a dataset or
    view."""
    return sample_collection._dataset._sample_collection


def require_sample_view(sample_collection):
    """Raises a clear error unless the collection's documents are samples of
    a regular dataset (not patches, frames or clips)."""
    dataset = sample_collection._dataset
    if dataset._is_generated or dataset.media_type == "group":
        raise BulkLabelingError(
            "Bulk labeling works on the samples of a dataset; this view's "
            "documents are %s. Select the samples in the regular grid "
            "instead" % ("groups" if dataset.media_type == "group" else
                         "patches, frames or clips")
        )


def is_full_dataset(sample_collection):
    return isinstance(sample_collection, fod.Dataset)


#: Use a collection scan instead of ``_id`` index lookups when a batch holds
#: at least this fraction of the collection
NATURAL_SCAN_FRACTION = 0.5


def scan_hint(coll, ids):
    """The hint for a query on a batch of ``ids``: a collection scan beats
    ``_id`` lookups when the batch holds most of the collection (about 25%
    faster for 100k of 100k), else None."""
    try:
        total = coll.estimated_document_count()
    except Exception:
        return None
    if total and len(ids) >= NATURAL_SCAN_FRACTION * total:
        return [("$natural", 1)]
    return None


#: Up to this many targets, their ids are gathered in one array (20 bytes
#: an id: at most 10 MB of the 16 MB a document may hold) and sliced into
#: batches; more are bucketed by id ranges
GROUPED_TARGET_MAX = 500_000

#: A bulk operation is split over several writers only when each gets at
#: least this many samples; below that, one batch is faster
MIN_PARALLEL_BATCH = 5_000


def write_workers():
    """How many batches of a bulk operation are written at once, each on its
    own connection, so that the server works on them in parallel.

    ``BULK_LABELING_WRITE_WORKERS`` sets it; the default is this machine's
    core count, at most 4 (measured on 2 cores: 2 writers take 0.55x the
    time of one; see docs/BENCHMARKS.md).
    """
    value = os.environ.get("BULK_LABELING_WRITE_WORKERS", "").strip()
    if value:
        try:
            workers = int(value)
        except ValueError:
            raise BulkLabelingError(
                "BULK_LABELING_WRITE_WORKERS must be an integer, not %r" % value
            )
        return max(1, workers)

    return max(1, min(4, os.cpu_count() or 1))


def batch_size_for(count, workers=None):
    """Sample ids per batch for an operation on ``count`` samples: at most
    :data:`ID_BATCH_SIZE`, and small enough that every writer gets a batch
    (but no smaller than :data:`MIN_PARALLEL_BATCH`)."""
    if workers is None:
        workers = write_workers()
    size = ID_BATCH_SIZE
    if workers > 1 and count:
        size = min(size, max(MIN_PARALLEL_BATCH, -(-count // workers)))
    return max(1, size)


def iter_id_batches(sample_collection, count=None, batch_size=None):
    """Streams the sample ids of a collection in batches (see
    :func:`batch_size_for`), never holding more than one batch in memory.

    Yields:
        :class:`bulk_labeling.core.idbatch.IdBatch` objects
    """
    if count is None:
        count = sample_collection.count()
    if is_full_dataset(sample_collection):
        pipeline = []
    else:
        pipeline = sample_collection._pipeline()

    # Sized here, not in the generator, so that a bad setting fails before
    # the caller writes anything
    batch_size = batch_size or batch_size_for(count)
    return _iter_packed_ids(
        sample_coll(sample_collection), pipeline, count, batch_size
    )


def iter_query_id_batches(dataset, query, count=None, batch_size=None):
    """Streams, in batches, the ids of the dataset's samples that match a
    MongoDB query."""
    coll = sample_coll(dataset)
    if count is None:
        count = coll.count_documents(query)
    batch_size = batch_size or batch_size_for(count)
    return _iter_packed_ids(coll, [{"$match": query}], count, batch_size)


def _iter_packed_ids(coll, pipeline, count, batch_size):
    """The server packs each batch of ids into one array, which is kept raw
    (see :class:`bulk_labeling.core.idbatch.IdBatch`)."""
    pipeline = pipeline + [{"$project": {"_id": 1}}]
    if count <= GROUPED_TARGET_MAX:
        # One array, sliced into batches: no sort (about 40% less server
        # time than $bucketAuto on 100k ids). The last slice takes whatever
        # the collection grew by since it was counted (split below)
        starts = list(range(0, max(count, 1), batch_size))
        slices = [
            {"$slice": ["$ids", start, batch_size]} for start in starts[:-1]
        ] + [{"$slice": ["$ids", starts[-1], 2**31 - 1]}]
        pipeline += [
            {"$group": {"_id": None, "ids": {"$push": "$_id"}}},
            {"$project": {"ids": slices}},
            {"$unwind": "$ids"},
        ]
    else:
        # Equal-count ranges of ids, never one document over the size limit
        pipeline.append(
            {
                "$bucketAuto": {
                    "groupBy": "$_id",
                    "buckets": -(-count // batch_size),
                    "output": {"ids": {"$push": "$_id"}},
                }
            }
        )
    pipeline.append(
        {"$project": {"_id": 0, "ids": 1, "count": {"$size": "$ids"}}}
    )

    raw = coll.with_options(codec_options=DEFAULT_RAW_BSON_OPTIONS)
    for doc in raw.aggregate(pipeline, allowDiskUse=True, batchSize=1):
        yield from IdBatch.from_document(doc).split(batch_size)


def map_batches(batches, process, workers=None):
    """Runs ``process(*batch)`` for every batch on up to ``workers`` threads
    and yields ``(batch, result)`` as each one finishes.

    Batches are drawn from the iterable only as threads free up, so at most
    ``workers`` are in memory at once. If one raises, the ones already
    running finish (and are yielded) before the error is raised.
    """
    if workers is None:
        workers = write_workers()

    batches = iter(batches)
    if workers <= 1:
        for batch in batches:
            yield batch, process(*batch)
        return

    error = None
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        running = {}

        def submit():
            for batch in batches:
                running[pool.submit(process, *batch)] = batch
                return

        for _ in range(workers):
            submit()

        while running:
            finished, _ = concurrent.futures.wait(
                running, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in finished:
                batch = running.pop(future)
                try:
                    result = future.result()
                except Exception as e:
                    error = error or e
                    continue

                yield batch, result
                if error is None:
                    submit()

    if error is not None:
        raise error


def utcnow():
    """The ``last_modified_at`` of an update made with update operators,
    taken once per command as FiftyOne's own bulk writes do (pipeline
    updates use ``$$NOW``, also one value per command).

    ``$currentDate`` stamps each document with its own time, so parallel
    writers all insert at the newest end of FiftyOne's ``last_modified_at``
    index: measured 20% more server CPU with two writers.
    """
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def reload_samples(dataset):
    """Refreshes in-memory :class:`fiftyone.core.sample.Sample` objects after
    raw database writes, as FiftyOne's own bulk writes do."""
    fos.Sample._reload_docs(dataset._sample_collection_name)


def allocate_id_prefixes(dataset, count):
    """Atomically reserves ``count`` distinct 4-byte ObjectId prefixes for a
    dataset.

    A prefix is a Unix timestamp of now or slightly later, so the ids built
    from it look like ordinary ObjectIds. Label ids are built server-side as
    ``prefix + the last 8 bytes of the sample id``: unique per (prefix,
    sample), and a prefix is never handed out twice for the same dataset.

    Returns:
        a list of 8-character hex strings
    """
    if count <= 0:
        return []

    state = get_db()[STATE_COLLECTION]
    now = int(ObjectId().generation_time.timestamp())
    doc = state.find_one_and_update(
        {"_id": dataset._doc.id},
        [
            {
                "$set": {
                    "next_id_prefix": {
                        "$add": [
                            {"$max": [{"$ifNull": ["$next_id_prefix", 0]}, now]},
                            count,
                        ]
                    }
                }
            }
        ],
        upsert=True,
        return_document=True,
    )
    end = doc["next_id_prefix"]
    return ["%08x" % value for value in range(end - count, end)]


#: The last 8 bytes of the current sample's id, as hex: the part of a
#: generated label id that comes from the sample
SAMPLE_ID_TAIL_EXPR = {"$substrBytes": [{"$toString": "$_id"}, 8, 16]}


def generated_id_expr(prefix, tail=SAMPLE_ID_TAIL_EXPR):
    """Returns the aggregation expression of the id that ``prefix`` gives to
    the label it creates on the current sample.

    Args:
        prefix: an 8-character hex prefix from :func:`allocate_id_prefixes`
        tail (SAMPLE_ID_TAIL_EXPR): the expression of the sample id's tail;
            pass a ``$$variable`` holding it to compute it once per sample
    """
    return {"$toObjectId": {"$concat": [prefix, tail]}}


def generated_id(prefix, sample_id):
    """Python twin of :func:`generated_id_expr`."""
    return ObjectId(prefix + str(sample_id)[8:])


def classifications_expr(field, labels):
    """The new value of a Classifications field, given an expression for its
    new list of labels.

    The container keeps its other attributes. A container left with no
    labels and nothing else is removed, so that a sample whose labels are all
    removed (or undone) looks like one never labeled.
    """
    container = "$" + field
    is_object = {"$eq": [{"$type": container}, "object"]}
    has_other_attributes = {
        "$gt": [
            {
                "$size": {
                    "$filter": {
                        "input": {"$objectToArray": container},
                        "cond": {
                            "$and": [
                                {"$not": [{"$in": ["$$this.k", ["_cls", "classifications"]]}]},
                                {"$ne": ["$$this.v", None]},
                            ]
                        },
                    }
                }
            },
            0,
        ]
    }
    return {
        "$let": {
            "vars": {"labels": labels},
            "in": {
                "$cond": [
                    {"$gt": [{"$size": "$$labels"}, 0]},
                    {
                        "$mergeObjects": [
                            {"$cond": [is_object, container, {"_cls": "Classifications"}]},
                            {"classifications": "$$labels"},
                        ]
                    },
                    {
                        "$cond": [
                            {"$and": [is_object, has_other_attributes]},
                            {"$mergeObjects": [container, {"classifications": []}]},
                            "$$REMOVE",
                        ]
                    },
                ]
            },
        }
    }
