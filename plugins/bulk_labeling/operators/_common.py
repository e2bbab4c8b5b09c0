"""Shared plumbing of the operators: targets, progress relay and results.

Operators are thin adapters: they build forms, parse params, call the core
and report back. No database logic lives here.
"""

import os

import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone.operators.constants import ViewTarget

from ..core.errors import BulkLabelingError
from ..core.progress import Progress

TARGET_LABELS = {
    ViewTarget.SELECTED_SAMPLES: "the selected samples",
    ViewTarget.CURRENT_VIEW: "the current view",
    ViewTarget.DATASET: "the whole dataset",
}


def bulk_operator_config(**kwargs):
    """The config of a bulk operator: it streams its progress to the App and
    runs now or as a delegated operation. ``kwargs`` as for
    :class:`fiftyone.operators.OperatorConfig`."""
    return foo.OperatorConfig(
        execute_as_generator=True,
        allow_immediate_execution=True,
        allow_delegated_execution=True,
        **kwargs
    )


def default_target(ctx):
    """The selected samples if any are selected, else the current view."""
    return (
        ViewTarget.SELECTED_SAMPLES if ctx.selected else ViewTarget.CURRENT_VIEW
    )


def target_view(ctx):
    """Resolves the samples an operator acts on.

    ``view_target`` is FiftyOne's standard choice (``SELECTED_SAMPLES``,
    ``CURRENT_VIEW``, ``DATASET``); when the caller names none, the selection
    wins over the view.
    """
    if ctx.dataset is None:
        raise BulkLabelingError("No dataset is loaded")

    if not (ctx.params.get("view_target") or ctx.request_params.get("view_target")):
        ctx.params["view_target"] = default_target(ctx)

    return ctx.target_view()


def current_sample_view(ctx):
    """The sample open in the App's sample viewer, as a view (the target of
    the operators placed there: never the whole view behind it)."""
    if ctx.dataset is None:
        raise BulkLabelingError("No dataset is loaded")
    if not ctx.current_sample:
        raise BulkLabelingError("No sample is open in the sample viewer")
    return ctx.dataset.select(ctx.current_sample)


class SampleViewerAction(object):
    """Mixin that turns a bulk operator into an action of the App's sample
    viewer, acting on the open sample only. List it before the operator::

        class LabelSampleAs(SampleViewerAction, LabelAs):
            viewer_name = "label_sample_as"
            viewer_description = "Add or remove concepts on this sample"
    """

    viewer_name = None
    viewer_description = None

    @property
    def config(self):
        config = super().config
        config.name = self.viewer_name
        config.description = self.viewer_description
        config.allow_delegated_execution = False  # one sample
        return config

    def resolve_placement(self, ctx):
        return types.Placement(
            types.Places.SAMPLES_VIEWER_ACTIONS,
            types.Button(label=self.config.label, icon=self.config.icon,
                         prompt=True),
        )

    def target(self, ctx):
        return current_sample_view(ctx)

    def describe_target(self, ctx):
        return {"kind": "CURRENT_SAMPLE", "label": "the sample being viewed"}


def describe_target(ctx):
    target = ctx.params.get("view_target") or default_target(ctx)
    return {"kind": target, "label": TARGET_LABELS.get(target, target)}


def user_of(ctx):
    """The user, when FiftyOne knows one (FiftyOne Enterprise)."""
    try:
        user = getattr(ctx, "user", None)
        if user is not None and getattr(user, "email", None):
            return user.email
        return ctx.user_id
    except Exception:
        return None


def relay(ctx, steps):
    """Runs a core generator, relaying its progress to the App (or to the
    delegated operation's record) and returning its result.

    Use as ``result = yield from relay(ctx, steps)`` in a generator
    ``execute``.
    """
    while True:
        try:
            event = next(steps)
        except StopIteration as stop:
            return stop.value

        if not isinstance(event, Progress):
            continue

        label = "%s: %d / %d" % (event.label, event.done, event.total)
        if ctx.delegated:
            ctx.set_progress(progress=event.fraction, label=label)
        else:
            yield ctx.ops.set_progress(progress=event.fraction, label=label)


def param_list(ctx, name):
    """A list param that the App may send as a list, a string or null."""
    value = ctx.params.get(name)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


#: ``BULK_LABELING_JSON_EDITOR``: ``"text"`` (default) or ``"code"``
JSON_EDITOR_ENV = "BULK_LABELING_JSON_EDITOR"


def json_text_view(rows=8):
    """The view of a JSON text param, validated inline as it is typed.

    By default a multi-line text area: FiftyOne's ``CodeView`` loads the
    Monaco editor from a CDN at run time, so it never becomes editable in an
    App without internet access. Where the App's browsers reach the CDN,
    ``BULK_LABELING_JSON_EDITOR=code`` (on the App server) gives the code
    editor, with JSON highlighting, instead.
    """
    editor = os.environ.get(JSON_EDITOR_ENV, "text").strip().lower()
    if editor == "code":
        return types.CodeView(language="json")
    return types.TextFieldView(multiline=True, rows=rows)


def add_dry_run_input(inputs):
    inputs.bool(
        "dry_run",
        default=False,
        label="Dry run",
        description="Only count what would change; write nothing",
        view=types.CheckboxView(),
    )


def show_result(outputs, with_conflicts=False):
    outputs.str("operation_id", label="Operation id")
    outputs.int("matched", label="Samples targeted")
    outputs.int("changed", label="Samples changed")
    if with_conflicts:
        outputs.int("num_conflicts", label="Conflicts left alone")
    return outputs


def reload_grid(ctx, result):
    """After a bulk write in the App: reload the grid (not after a dry run)."""
    if result and not result.get("dry_run"):
        yield ctx.ops.reload_dataset()


def streams_to_app(ctx):
    """Whether this run can stream progress to an App.

    FiftyOne discards what a generator ``execute`` returns when it is run by
    :func:`fiftyone.operators.execute_operator` or by a delegated worker, so
    operators stream only to the App (whose requests name their
    ``operator_uri``) and return their result everywhere else.
    """
    return not ctx.delegated and "operator_uri" in ctx.request_params


def execute_steps(ctx, operator, steps_factory, after=None):
    """Runs a core generator the way the caller can consume it.

    Args:
        ctx: the execution context
        operator: the operator, whose ``resolve_output`` renders the result
        steps_factory: a callable returning the core generator; called inside
            the run so that validation errors surface the same way
        after (None): a callable ``(ctx, result)`` returning App operations
            to trigger on success (reload the grid, set a view, ...)

    Returns:
        the result dict, or a generator for the App
    """
    if not streams_to_app(ctx):
        return yield_none(relay(ctx, steps_factory()))

    return _stream(ctx, operator, steps_factory, after)


def yield_none(generator):
    """Drains a generator that yields nothing useful and returns its value
    (delegated runs report progress through ``ctx.set_progress``)."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value


def _stream(ctx, operator, steps_factory, after):
    try:
        result = yield from relay(ctx, steps_factory())
    except BulkLabelingError as e:
        yield ctx.ops.notify(str(e), variant="error")
        return

    if after is not None:
        for message in after(ctx, result):
            yield message

    outputs = operator.resolve_output(ctx)
    if outputs is not None:
        yield ctx.ops.show_output(outputs.to_json(), result)
