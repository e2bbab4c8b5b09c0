"""The plugin's operators: thin adapters over :mod:`bulk_labeling.core`."""

from .history import (
    BulkHistory,
    CheckPendingOperations,
    ResumeBulkOperation,
    UndoBulkOperation,
)
from .labeling import LabelAs, LabelSampleAs, ManageConcepts
from .metadata import (
    EditMetadata,
    EditSampleMetadata,
    SetGeolocation,
    SetMetadataSchema,
)
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
    LabelSampleAs,
    ManageConcepts,
    BulkHistory,
    UndoBulkOperation,
    ResumeBulkOperation,
    CheckPendingOperations,
    UploadWithConcepts,
    EditMetadata,
    EditSampleMetadata,
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
