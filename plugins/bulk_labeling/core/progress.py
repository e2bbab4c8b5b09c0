"""Progress reporting shared by the Python API and the operators.

Core operations are written as generators that yield :class:`Progress` events
and return their result. :func:`run` drives one to completion with a FiftyOne
progress bar; operators relay the same events to the App instead.
"""

import dataclasses

import fiftyone.core.utils as fou


@dataclasses.dataclass
class Progress:
    """One progress event of a bulk operation."""

    done: int
    total: int
    label: str = ""

    @property
    def fraction(self):
        return min(1.0, self.done / self.total) if self.total else 1.0


def run(steps, progress=None):
    """Runs a generator of :class:`Progress` events and returns its result.

    Args:
        steps: a generator that yields :class:`Progress` and returns a result
        progress (None): whether to render a progress bar (True/False), None
            to use ``fo.config.show_progress_bars``, or a callable that is
            passed each :class:`Progress` event

    Returns:
        the generator's return value
    """
    callback = progress if callable(progress) else None
    pb = None
    try:
        while True:
            try:
                event = next(steps)
            except StopIteration as stop:
                return stop.value

            if callback is not None:
                callback(event)
                continue

            if pb is None:
                pb = fou.ProgressBar(
                    total=event.total, progress=progress, iters_str="samples"
                )
                pb.start()

            pb.set_iteration(min(event.done, event.total))
    finally:
        if pb is not None:
            pb.close()
