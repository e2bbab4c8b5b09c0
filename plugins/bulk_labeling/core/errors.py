"""Errors raised by bulk labeling operations."""


class BulkLabelingError(ValueError):
    """Raised for invalid input or an impossible request.

    Every public function validates its input before it writes anything, so
    when this is raised the database has not been modified.
    """
