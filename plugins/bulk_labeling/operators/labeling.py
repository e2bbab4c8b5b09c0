"""Operators for "Label as..." and the concept vocabulary."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from ..core import concepts as conc
from ..core import labeling
from ..core.errors import BulkLabelingError
from . import _common


def _concept_input(inputs, ctx, name, label, required=True, field=None):
    field = field or ctx.params.get("field") or conc.DEFAULT_FIELD
    vocabulary = conc.get_vocabulary(ctx.dataset, field) if ctx.dataset else []
    inputs.list(
        name,
        types.String(),
        required=required,
        label=label,
        description="Pick concepts, or type a new one to create it",
        view=types.AutocompleteView(
            choices=[types.Choice(c, label=c) for c in vocabulary],
            allow_user_input=True,
            allow_duplicates=False,
        ),
    )


class LabelAs(foo.Operator):
    """Adds or removes concepts on the selected samples or the current view."""

    @property
    def config(self):
        return _common.bulk_operator_config(
            name="label_as",
            label="Label as...",
            description="Add or remove concepts on many samples at once",
            icon="/assets/label_as.svg",
            dynamic=True,
        )

    def resolve_placement(self, ctx):
        return types.Placement(
            types.Places.SAMPLES_GRID_SECONDARY_ACTIONS,
            types.Button(
                label="Label as...",
                icon="/assets/label_as.svg",
                prompt=True,
            ),
        )

    def target(self, ctx):
        return _common.target_view(ctx)

    def describe_target(self, ctx):
        return _common.describe_target(ctx)

    def resolve_input(self, ctx):
        inputs = types.Object()
        view = self.target(ctx)
        inputs.enum(
            "mode",
            ["add", "remove"],
            default="add",
            label="Mode",
            view=types.RadioGroup(
                choices=[
                    types.Choice("add", label="Add"),
                    types.Choice("remove", label="Remove"),
                ]
            ),
        )
        _concept_input(inputs, ctx, "concepts", "Concepts")
        inputs.str(
            "field",
            default=conc.DEFAULT_FIELD,
            label="Field",
            description="The Classifications field that holds the concepts",
        )
        inputs.bool(
            "negative",
            default=False,
            label="Negative",
            description="Record that these concepts are absent (Clarifai's value 0)",
        )
        _common.add_dry_run_input(inputs)

        try:
            preview = labeling.label(
                view,
                dry_run=True,
                progress=False,
                **self._parse(ctx),
            ) if ctx.params.get("concepts") else None
            count = preview["matched"] if preview else view.count()
            message = "%d sample(s) targeted" % count
            if preview:
                message += ", %d will change" % preview["changed"]
            inputs.view("preview", types.Notice(label=message))
        except BulkLabelingError as e:
            inputs.view("preview", types.Error(label=str(e)))

        return types.Property(inputs, view=types.View(label="Label as..."))

    def _parse(self, ctx):
        concepts = _common.param_list(ctx, "concepts")
        mode = ctx.params.get("mode") or "add"
        if mode not in ("add", "remove"):
            raise BulkLabelingError("mode must be 'add' or 'remove'")

        return {
            "add": concepts if mode == "add" else None,
            "remove": concepts if mode == "remove" else None,
            "field": ctx.params.get("field") or conc.DEFAULT_FIELD,
            "negative": bool(ctx.params.get("negative", False)),
        }

    def execute(self, ctx):
        def steps():
            kwargs = self._parse(ctx)
            if not (kwargs["add"] or kwargs["remove"]):
                raise BulkLabelingError("No concepts given")

            return labeling.iter_label(
                self.target(ctx),
                dry_run=bool(ctx.params.get("dry_run", False)),
                user=_common.user_of(ctx),
                target=self.describe_target(ctx),
                **kwargs,
            )

        return _common.execute_steps(ctx, self, steps, after=_common.reload_grid)

    def resolve_output(self, ctx):
        return types.Property(_common.show_result(types.Object()))


class LabelSampleAs(_common.SampleViewerAction, LabelAs):
    """"Label as..." on the sample open in the sample viewer."""

    viewer_name = "label_sample_as"
    viewer_description = "Add or remove concepts on this sample"


class ManageConcepts(foo.Operator):
    """Lists, creates, renames and deletes concepts."""

    @property
    def config(self):
        return _common.bulk_operator_config(
            name="manage_concepts",
            label="Manage concepts",
            description="List, create, rename or delete concepts",
            icon="/assets/concepts.svg",
            dynamic=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        action = ctx.params.get("action") or "list"
        inputs.enum(
            "action",
            ["list", "create", "rename", "delete"],
            default="list",
            label="Action",
            view=types.RadioGroup(),
        )
        inputs.str("field", default=conc.DEFAULT_FIELD, label="Field")
        field = ctx.params.get("field") or conc.DEFAULT_FIELD
        vocabulary = conc.get_vocabulary(ctx.dataset, field)
        if action == "create":
            _concept_input(inputs, ctx, "concepts", "New concepts")
        elif action in ("rename", "delete"):
            inputs.enum(
                "concept",
                vocabulary,
                required=True,
                label="Concept",
                view=types.AutocompleteView(),
            )
            if action == "rename":
                inputs.str("new_name", required=True, label="New name")
            _common.add_dry_run_input(inputs)

        return types.Property(inputs, view=types.View(label="Manage concepts"))

    def execute(self, ctx):
        action = ctx.params.get("action") or "list"
        field = ctx.params.get("field") or conc.DEFAULT_FIELD
        dry_run = bool(ctx.params.get("dry_run", False))
        user = _common.user_of(ctx)

        if action == "list":
            return {"concepts": conc.list_concepts(ctx.view, field=field)}

        if action == "create":
            created = conc.create_concepts(
                ctx.dataset, _common.param_list(ctx, "concepts"), field=field
            )
            return {"created": created,
                    "concepts": conc.get_vocabulary(ctx.dataset, field)}

        if action == "rename":
            def steps():
                return conc.iter_rename_concept(
                    ctx.dataset, ctx.params.get("concept"),
                    ctx.params.get("new_name"), field=field,
                    dry_run=dry_run, user=user,
                )
        elif action == "delete":
            def steps():
                return conc.iter_delete_concept(
                    ctx.dataset, ctx.params.get("concept"), field=field,
                    dry_run=dry_run, user=user,
                )
        else:
            raise BulkLabelingError(
                "action must be one of list, create, rename, delete"
            )

        return _common.execute_steps(ctx, self, steps, after=_common.reload_grid)

    def resolve_output(self, ctx):
        outputs = types.Object()
        if (ctx.params.get("action") or "list") in ("rename", "delete"):
            _common.show_result(outputs)
        else:
            outputs.list("concepts", types.Object(), label="Concepts")
        return types.Property(outputs)
