"""Plain Python entry points that wrap the core's progress-reporting
generators (see :mod:`bulk_labeling.core.progress`)."""

import fiftyone as fo

from .core import concepts as _concepts
from .core import history as _history
from .core.progress import run as _run


def rename_concept(dataset, old, new, field=_concepts.DEFAULT_FIELD,
                   dry_run=False, progress=None):
    """Renames a concept in the vocabulary and on every sample.

    Returns:
        ``{"operation_id", "matched", "changed"}``
    """
    return _run(
        _concepts.iter_rename_concept(dataset, old, new, field=field,
                                      dry_run=dry_run),
        progress=progress,
    )


def delete_concept(dataset, name, field=_concepts.DEFAULT_FIELD,
                   dry_run=False, progress=None):
    """Deletes a concept from the vocabulary and from every sample.

    Returns:
        ``{"operation_id", "matched", "changed"}``
    """
    return _run(
        _concepts.iter_delete_concept(dataset, name, field=field,
                                      dry_run=dry_run),
        progress=progress,
    )


def history(dataset, limit=50, types=None, statuses=None):
    """Returns the dataset's bulk operations, newest first, and warns about
    any that were interrupted."""
    _history.warn_pending(dataset)
    return _history.list_operations(
        dataset, limit=limit, types=types, statuses=statuses
    )


def pending(dataset):
    """Returns the operations that were interrupted and need a resume or an
    undo."""
    return _history.pending_operations(dataset)


def undo(dataset, operation_id=None, dry_run=False, progress=None):
    """Undoes a bulk operation (by default the latest one), restoring the
    exact prior state of the samples it changed. Samples changed again since
    are left alone and reported in ``conflicts``.
    """
    return _run(
        _history.iter_undo(dataset, operation_id=operation_id,
                           dry_run=dry_run),
        progress=progress,
    )


def resume(dataset, operation_id, progress=None):
    """Finishes an operation that a crash left ``pending``."""
    return _run(_history.iter_resume(dataset, operation_id), progress=progress)


def load_dataset(name):
    """Loads a dataset like :func:`fiftyone.load_dataset`, and warns about
    bulk operations that were interrupted on it."""
    dataset = fo.load_dataset(name)
    _history.warn_pending(dataset)
    return dataset
