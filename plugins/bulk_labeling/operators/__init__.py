"""The plugin's operators: thin adapters over :mod:`bulk_labeling.core`."""

from .history import (
    BulkHistory,
    CheckPendingOperations,
    ResumeBulkOperation,
    UndoBulkOperation,
)
from .labeling import LabelAs, ManageConcepts
from .metadata import EditMetadata, SetGeolocation, SetMetadataSchema
from .upload import UploadWithConcepts
from .similarity import (
    BuildSimilarityIndex,
    BuildSimilarityIndexShard,
    FindSimilar,
    FindSimilarToSample,
)
from ..panel import BulkLabelingPanel, OpenBulkLabelingPanel

OPERATORS = [
    LabelAs,
    ManageConcepts,
    BulkHistory,
    UndoBulkOperation,
    ResumeBulkOperation,
    CheckPendingOperations,
    UploadWithConcepts,
    EditMetadata,
    SetMetadataSchema,
    SetGeolocation,
    BuildSimilarityIndex,
    BuildSimilarityIndexShard,
    FindSimilar,
    FindSimilarToSample,
]

PANELS = [BulkLabelingPanel, OpenBulkLabelingPanel]


def register_all(plugin):
    for cls in OPERATORS + PANELS:
        plugin.register(cls)
