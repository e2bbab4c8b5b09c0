"""The plugin's operators: thin adapters over :mod:`bulk_labeling.core`."""

from .history import (
    BulkHistory,
    CheckPendingOperations,
    ResumeBulkOperation,
    UndoBulkOperation,
)
from .labeling import LabelAs, ManageConcepts

OPERATORS = [
    LabelAs,
    ManageConcepts,
    BulkHistory,
    UndoBulkOperation,
    ResumeBulkOperation,
    CheckPendingOperations,
]

PANELS = []


def register_all(plugin):
    for cls in OPERATORS + PANELS:
        plugin.register(cls)
