"""Operators for bulk metadata: edit_metadata, set_metadata_schema and
set_geolocation. Thin adapters over :mod:`bulk_labeling.core.metadata`."""

import json

import fiftyone.operators as foo
import fiftyone.operators.types as types

from ..core import metadata as meta
from ..core.errors import BulkLabelingError
from . import _common

METADATA_ICON = "/assets/metadata.svg"
GEO_ICON = "/assets/geo.svg"

#: The preview shows at most this many characters of a document
_PREVIEW_CHARS = 4000

_MODE_CHOICES = [
    ("merge", "Merge", "Objects deep-merge; scalars and arrays are replaced"),
    ("overwrite", "Overwrite", "Replace each sample's whole document"),
    ("remove", "Remove", 'Delete keys: {"camera": true, "site": {"row": true}}'),
]


def _json_text(value):
    text = json.dumps(value, indent=2, ensure_ascii=False)
    if len(text) > _PREVIEW_CHARS:
        text = text[:_PREVIEW_CHARS] + "\n..."
    return text


def _json_input(inputs, ctx, name, **kwargs):
    """A JSON param: a code editor in the App; Python callers may also pass
    a dict, which FiftyOne's param validation accepts only for an object
    property."""
    if isinstance(ctx.params.get(name), dict):
        kwargs.pop("default", None)
        return inputs.obj(name, view=types.JSONView(), **kwargs)

    return inputs.str(name, view=_common.json_text_view(), **kwargs)


def _mark_invalid(prop, message):
    """Shows ``message`` under the input and keeps the form from executing."""
    prop.invalid = True
    prop.error_message = message


def _field_param(ctx, default):
    value = ctx.params.get("field")
    if isinstance(value, str) and value.strip():
        return value.strip()
    return default


class EditMetadata(foo.Operator):
    """Merges, overwrites or removes custom metadata on the selected samples
    or the current view."""

    @property
    def config(self):
        return _common.bulk_operator_config(
            name="edit_metadata",
            label="Edit metadata",
            description="Merge, overwrite or remove JSON metadata on many samples at once",
            icon=METADATA_ICON,
            dynamic=True,
        )

    def resolve_placement(self, ctx):
        return types.Placement(
            types.Places.SAMPLES_GRID_SECONDARY_ACTIONS,
            types.Button(
                label="Edit metadata",
                icon=METADATA_ICON,
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
            [m for m, _, _ in _MODE_CHOICES],
            default="merge",
            label="Mode",
            view=types.RadioGroup(
                choices=[
                    types.Choice(m, label=label, description=description)
                    for m, label, description in _MODE_CHOICES
                ]
            ),
        )
        metadata_prop = _json_input(
            inputs,
            ctx,
            "metadata",
            required=True,
            label="Metadata (JSON object)",
            description=(
                "At most %d KiB, nested at most %d levels; keys cannot start "
                "with '$' or contain '.'"
                % (meta.MAX_PAYLOAD_BYTES // 1024, meta.MAX_DEPTH)
            ),
        )
        inputs.str(
            "field",
            default=meta.DEFAULT_FIELD,
            label="Field",
            description="The field that holds the metadata "
            "(FiftyOne's own 'metadata' is reserved for media metadata)",
        )
        _common.add_dry_run_input(inputs)

        metadata = ctx.params.get("metadata")
        if metadata is None or (isinstance(metadata, str) and not metadata.strip()):
            inputs.view(
                "preview",
                types.Notice(label="%d sample(s) targeted" % view.count()),
            )
        else:
            try:
                preview = meta.preview_edit(
                    view,
                    metadata,
                    mode=ctx.params.get("mode") or "merge",
                    field=_field_param(ctx, meta.DEFAULT_FIELD),
                )
                self._show_preview(inputs, preview)
            except BulkLabelingError as e:
                _mark_invalid(metadata_prop, str(e))
                inputs.view("preview", types.Error(label=str(e)))

        return types.Property(inputs, view=types.View(label="Edit metadata"))

    def _show_preview(self, inputs, preview):
        message = "%d sample(s) targeted, %d will change" % (
            preview["matched"],
            preview["changed"],
        )
        inputs.view("preview", types.Notice(label=message))
        if preview["schema_errors"]:
            inputs.view(
                "preview_schema",
                types.Error(
                    label="Sample %s would violate the schema: %s"
                    % (preview["filepath"], "; ".join(preview["schema_errors"]))
                ),
            )
        if preview["sample_id"] is not None:
            inputs.md(
                "**Result for %s**\n\n```json\n%s\n```"
                % (preview["filepath"], _json_text(preview["after"])),
                name="preview_sample",
            )

    def _parse(self, ctx):
        return {
            "metadata": ctx.params.get("metadata"),
            "mode": ctx.params.get("mode") or "merge",
            "field": _field_param(ctx, meta.DEFAULT_FIELD),
        }

    def execute(self, ctx):
        def steps():
            return meta.iter_edit_metadata(
                self.target(ctx),
                dry_run=bool(ctx.params.get("dry_run", False)),
                user=_common.user_of(ctx),
                target=self.describe_target(ctx),
                **self._parse(ctx),
            )

        return _common.execute_steps(ctx, self, steps, after=_common.reload_grid)

    def resolve_output(self, ctx):
        return types.Property(_common.show_result(types.Object()))


class EditSampleMetadata(_common.SampleViewerAction, EditMetadata):
    """"Edit metadata" on the sample open in the sample viewer."""

    viewer_name = "edit_sample_metadata"
    viewer_description = "Merge, overwrite or remove JSON metadata on this sample"


class SetMetadataSchema(foo.Operator):
    """Sets or clears the JSON Schema of a metadata field."""

    @property
    def config(self):
        return _common.bulk_operator_config(
            name="set_metadata_schema",
            label="Set metadata schema",
            description="Validate every metadata edit and upload against a JSON Schema",
            icon=METADATA_ICON,
            dynamic=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        field = _field_param(ctx, meta.DEFAULT_FIELD)
        inputs.str(
            "field",
            default=meta.DEFAULT_FIELD,
            label="Field",
            description="The metadata field the schema applies to",
        )
        current = None
        try:
            if ctx.dataset is not None:
                meta.validate_field_name(field)
                current = meta.get_metadata_schema(ctx.dataset, field)
        except BulkLabelingError as e:
            inputs.view("field_error", types.Error(label=str(e)))

        schema_prop = _json_input(
            inputs,
            ctx,
            "schema",
            default=json.dumps(current, indent=2) if current else None,
            label="JSON Schema",
            description="Leave empty to clear the schema",
        )

        schema = ctx.params.get("schema")
        try:
            parsed = meta.parse_schema(schema)
            if parsed is None:
                message = (
                    "The schema of '%s' will be cleared" % field
                    if current
                    else "'%s' has no schema; enter one to set it" % field
                )
            else:
                message = (
                    "Valid JSON Schema. Every later edit and upload of '%s' "
                    "must satisfy it; existing samples that violate it will "
                    "be counted" % field
                )
            inputs.view("status", types.Notice(label=message))
        except BulkLabelingError as e:
            _mark_invalid(schema_prop, str(e))
            inputs.view("status", types.Error(label=str(e)))

        return types.Property(inputs, view=types.View(label="Metadata schema"))

    def execute(self, ctx):
        def steps():
            if ctx.dataset is None:
                raise BulkLabelingError("No dataset is loaded")
            return meta.iter_set_metadata_schema(
                ctx.dataset,
                ctx.params.get("schema"),
                field=_field_param(ctx, meta.DEFAULT_FIELD),
                user=_common.user_of(ctx),
            )

        return _common.execute_steps(ctx, self, steps)

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("field", label="Field")
        outputs.str("schema", label="Schema")
        outputs.int("checked", label="Samples with metadata")
        outputs.int("violations", label="Samples that violate the schema")
        outputs.list(
            "violating_samples", types.Object(), label="First violating samples"
        )
        return types.Property(outputs)


class SetGeolocation(foo.Operator):
    """Sets or removes a GeoLocation on the selected samples or the current
    view."""

    @property
    def config(self):
        return _common.bulk_operator_config(
            name="set_geolocation",
            label="Set geolocation",
            description="Set a latitude/longitude on many samples at once (Map panel)",
            icon=GEO_ICON,
            dynamic=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        view = _common.target_view(ctx)
        mode = ctx.params.get("mode") or "set"
        inputs.enum(
            "mode",
            ["set", "remove"],
            default="set",
            label="Mode",
            view=types.RadioGroup(
                choices=[
                    types.Choice("set", label="Set"),
                    types.Choice("remove", label="Remove"),
                ]
            ),
        )
        if mode == "set":
            inputs.float(
                "latitude", required=True, label="Latitude",
                description="In [-90, 90]", min=-90, max=90,
            )
            inputs.float(
                "longitude", required=True, label="Longitude",
                description="In [-180, 180]", min=-180, max=180,
            )
        inputs.str(
            "field",
            default=meta.DEFAULT_GEO_FIELD,
            label="Field",
            description="The GeoLocation field",
        )
        _common.add_dry_run_input(inputs)

        message = "%d sample(s) targeted" % view.count()
        try:
            if mode == "set":
                lat, lon = ctx.params.get("latitude"), ctx.params.get("longitude")
                if lat is not None or lon is not None:
                    meta.parse_coordinates(lat, lon)
            elif mode != "remove":
                raise BulkLabelingError("mode must be 'set' or 'remove'")
            inputs.view("preview", types.Notice(label=message))
        except BulkLabelingError as e:
            inputs.view("preview", types.Error(label=str(e)))

        return types.Property(inputs, view=types.View(label="Set geolocation"))

    def execute(self, ctx):
        def steps():
            mode = ctx.params.get("mode") or "set"
            return meta.iter_set_geolocation(
                _common.target_view(ctx),
                latitude=ctx.params.get("latitude") if mode == "set" else None,
                longitude=ctx.params.get("longitude") if mode == "set" else None,
                mode=mode,
                field=_field_param(ctx, meta.DEFAULT_GEO_FIELD),
                dry_run=bool(ctx.params.get("dry_run", False)),
                user=_common.user_of(ctx),
                target=_common.describe_target(ctx),
            )

        return _common.execute_steps(ctx, self, steps, after=_common.reload_grid)

    def resolve_output(self, ctx):
        return types.Property(_common.show_result(types.Object()))
