"""Operators for the operation journal: history, undo and resume."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from ..core import history
from . import _common


class BulkHistory(foo.Operator):
    """Lists the dataset's bulk operations, newest first."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="bulk_history",
            label="Bulk operation history",
            description="The audit log of every bulk operation on this dataset",
            icon="/assets/history.svg",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.int("limit", default=20, label="How many")
        inputs.list("types", types.String(), label="Only these types")
        inputs.list("statuses", types.String(), label="Only these statuses")
        return types.Property(inputs, view=types.View(label="Bulk history"))

    def execute(self, ctx):
        pending = history.warn_pending(ctx.dataset)
        operations = history.list_operations(
            ctx.dataset,
            limit=ctx.params.get("limit", 20),
            types=_common.param_list(ctx, "types") or None,
            statuses=_common.param_list(ctx, "statuses") or None,
        )
        return {"operations": operations, "pending": len(pending)}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.int("pending", label="Interrupted operations")
        outputs.list("operations", types.Object(), label="Operations")
        return types.Property(outputs)


class UndoBulkOperation(foo.Operator):
    """Undoes a bulk operation, by default the latest one."""

    @property
    def config(self):
        return _common.bulk_operator_config(
            name="undo_bulk_operation",
            label="Undo bulk operation",
            description="Restore the samples a bulk operation changed",
            icon="/assets/undo.svg",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        recent = history.list_operations(
            ctx.dataset, limit=20, statuses=[history.APPLIED, history.PENDING]
        )
        recent = [op for op in recent if op["type"] != "undo"]
        inputs.enum(
            "operation_id",
            [op["operation_id"] for op in recent],
            label="Operation",
            description="Defaults to the latest applied operation",
            view=types.DropdownView(
                choices=[
                    types.Choice(
                        op["operation_id"],
                        label="%s: %s (%d changed)"
                        % (op["started_at"][:19], op["type"], op["changed"]),
                    )
                    for op in recent
                ]
            ),
        )
        _common.add_dry_run_input(inputs)
        return types.Property(inputs, view=types.View(label="Undo"))

    def execute(self, ctx):
        def steps():
            return history.iter_undo(
                ctx.dataset,
                operation_id=ctx.params.get("operation_id") or None,
                dry_run=bool(ctx.params.get("dry_run", False)),
                user=_common.user_of(ctx),
            )

        return _common.execute_steps(ctx, self, steps, after=_common.reload_grid)

    def resolve_output(self, ctx):
        outputs = _common.show_result(types.Object(), with_conflicts=True)
        outputs.str("undone", label="Undone operation")
        return types.Property(outputs)


class ResumeBulkOperation(foo.Operator):
    """Finishes a bulk operation that a crash left pending."""

    @property
    def config(self):
        return _common.bulk_operator_config(
            name="resume_bulk_operation",
            label="Resume interrupted bulk operation",
            icon="/assets/history.svg",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        pending = history.pending_operations(ctx.dataset)
        inputs.enum(
            "operation_id",
            [op["operation_id"] for op in pending],
            required=True,
            label="Interrupted operation",
        )
        return types.Property(inputs)

    def execute(self, ctx):
        def steps():
            return history.iter_resume(ctx.dataset, ctx.params["operation_id"])

        return _common.execute_steps(ctx, self, steps, after=_common.reload_grid)


class CheckPendingOperations(foo.Operator):
    """Warns, when a dataset is opened in the App, about bulk operations that
    were interrupted."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="check_pending_operations",
            label="Check interrupted bulk operations",
            unlisted=True,
            on_dataset_open=True,
        )

    def execute(self, ctx):
        pending = history.warn_pending(ctx.dataset)
        if pending:
            ctx.ops.notify(
                "%d bulk operation(s) on this dataset were interrupted. Open "
                "the Bulk Labeling panel to resume or undo them" % len(pending),
                variant="warning",
            )
        return {"pending": pending}
