"""Bulk labeling for FiftyOne.

A FiftyOne plugin (``@bulk-labeling/bulk_labeling``) and a plain Python API
to label many samples at once::

    import bulk_labeling as bl

    bl.label(dataset.select(ids), add=["cat"])
    bl.undo(dataset)

Importing this package never imports torch or open_clip; the functions that
need them import them when called.
"""

from .core.concepts import (
    create_concepts,
    get_vocabulary,
    list_concepts,
    normalize_concepts,
)
from .core.errors import BulkLabelingError
from .core.labeling import label
from .core.metadata import (
    edit_metadata,
    get_metadata_schema,
    set_geolocation,
    set_metadata_schema,
)
from .core.upload import upload, uploaded_view
from .core.similarity import (
    build_similarity_index,
    find_similar,
    index_status as similarity_index_status,
    sync_index,
    update_similarity_index,
)
from .api import (
    delete_concept,
    history,
    load_dataset,
    pending,
    rename_concept,
    resume,
    undo,
)


def register(plugin):
    """Registers the plugin's operators and panel with FiftyOne."""
    from .operators import register_all

    register_all(plugin)
