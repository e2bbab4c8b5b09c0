"""Operator for "Upload with concepts"."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from ..core import concepts as conc
from ..core import upload
from ..core.errors import BulkLabelingError
from . import _common
from .labeling import _concept_input


#: What the App's file input accepts: FileView matches name endings,
#: case-sensitively (the server checks the content of every file anyway)
_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".webp",
               ".tif", ".tiff")
_ACCEPTED_TYPES = ",".join(_EXTENSIONS + tuple(e.upper() for e in _EXTENSIONS))


def _show_batch(ctx, result):
    """Reloads the App and shows the uploaded batch in the grid."""
    if not result or not result.get("operation_id"):
        if result and result.get("skipped"):
            yield ctx.ops.notify(
                "Nothing was added: %d file(s) skipped" % len(result["skipped"]),
                variant="warning",
            )
        return

    yield ctx.ops.reload_dataset()
    yield ctx.ops.set_view(
        view=upload.uploaded_view(ctx.dataset, result["operation_id"])
    )
    if result.get("index"):
        yield ctx.ops.notify(result["index"], variant="info")


def _missing_message(count):
    return (
        "%d file(s) listed in the form arrived without content (the browser "
        "was still reading them): add them again" % count
    )


class UploadWithConcepts(foo.Operator):
    """Imports images (browser files and/or server paths) with concepts and
    metadata, in one journaled bulk write."""

    @property
    def config(self):
        return _common.bulk_operator_config(
            name="upload_with_concepts",
            label="Upload with concepts",
            description=(
                "Import images from your computer or the server, labeled "
                "with concepts and metadata"
            ),
            icon="/assets/upload.svg",
            dynamic=True,
        )

    def resolve_placement(self, ctx):
        return types.Placement(
            types.Places.SAMPLES_GRID_SECONDARY_ACTIONS,
            types.Button(
                label="Upload with concepts",
                icon="/assets/upload.svg",
                prompt=True,
            ),
        )

    def resolve_delegation(self, ctx):
        # Browser files travel in the request: they are written right away,
        # never stored in a delegated operation's record
        if ctx.params.get("files"):
            return False
        return None

    def resolve_input(self, ctx):
        inputs = types.Object()
        if ctx.dataset is not None and ctx.dataset.media_type not in (None, "image"):
            inputs.view(
                "unsupported",
                types.Error(
                    label="Uploads add images; this dataset holds %s samples"
                    % ctx.dataset.media_type
                ),
            )
            return types.Property(inputs)

        inputs.list(
            "files",
            types.UploadedFile(),
            required=False,
            label="Files from your computer",
            description=(
                "Up to %d MiB per file and %d MiB in all; they are copied "
                "to the server's media folder"
                % (upload.MAX_FILE_BYTES // 2**20, upload.MAX_TOTAL_BYTES // 2**20)
            ),
            view=types.ListView(
                items=types.FileView(
                    label="Image",
                    types=_ACCEPTED_TYPES,
                    # The form's live updates carry names and sizes only;
                    # the content is sent once, on execute
                    lite=True,
                    max_size=upload.MAX_FILE_BYTES,
                    max_size_error_message="Files over %d MiB must be "
                    "imported by server path" % (upload.MAX_FILE_BYTES // 2**20),
                )
            ),
        )
        inputs.list(
            "paths",
            types.String(),
            required=False,
            label="Server paths",
            description=(
                "Files, folders or glob patterns on the server, e.g. "
                "/data/photos or /data/**/*.jpg"
            ),
        )
        inputs.file(
            "directory",
            required=False,
            label="Server folder",
            description="Or choose a folder on the server",
            view=types.FileExplorerView(
                choose_dir=True,
                button_label="Choose a folder...",
                choose_button_label="Import this folder",
            ),
        )
        inputs.bool(
            "recursive",
            default=True,
            label="Include subfolders",
        )
        _concept_input(inputs, ctx, "concepts", "Concepts", required=False)
        inputs.str(
            "field",
            default=conc.DEFAULT_FIELD,
            label="Concepts field",
            description="The Classifications field that holds the concepts",
        )
        inputs.str(
            "metadata",
            required=False,
            label="Metadata",
            description="A JSON object stored on every new sample",
            view=_common.json_text_view(),
        )
        inputs.str(
            "metadata_field",
            default=upload.DEFAULT_METADATA_FIELD,
            label="Metadata field",
        )
        inputs.bool(
            "skip_existing",
            default=True,
            label="Skip files already in the dataset",
        )

        try:
            num_files = len(_common.param_list(ctx, "files"))
            num_paths = len(self._paths(ctx))
            if num_files or num_paths:
                message = "%d file(s) and %d server path(s) to import" % (
                    num_files, num_paths)
                if num_files and ctx.dataset is not None:
                    message += "; files are saved to %s" % (
                        upload.default_media_dir(ctx.dataset))
                inputs.view("preview", types.Notice(label=message))
        except BulkLabelingError as e:
            inputs.view("preview", types.Error(label=str(e)))

        return types.Property(
            inputs, view=types.View(label="Upload with concepts")
        )

    def _paths(self, ctx):
        paths = _common.param_list(ctx, "paths")
        directory = ctx.params.get("directory")
        if isinstance(directory, dict):
            directory = directory.get("absolute_path") or directory.get("path")
        if directory:
            paths.append(directory)
        return paths

    def _parse(self, ctx):
        """The core's arguments, and how many browser files were listed in
        the form but arrived without content (a file the browser was still
        reading when the form was submitted)."""
        files = ctx.params.get("files")
        if isinstance(files, dict):
            files = [files]
        files = files or []
        received = [f for f in files if f]
        kwargs = {
            "paths": self._paths(ctx),
            "files": received,
            "concepts": _common.param_list(ctx, "concepts"),
            "field": ctx.params.get("field") or conc.DEFAULT_FIELD,
            "metadata": ctx.params.get("metadata") or None,
            "metadata_field": (
                ctx.params.get("metadata_field") or upload.DEFAULT_METADATA_FIELD
            ),
            "recursive": bool(ctx.params.get("recursive", True)),
            "skip_existing": bool(ctx.params.get("skip_existing", True)),
        }
        return kwargs, len(files) - len(received)

    def execute(self, ctx):
        kwargs, missing = self._parse(ctx)

        def steps():
            if ctx.dataset is None:
                raise BulkLabelingError("No dataset is loaded")
            if missing and not kwargs["files"] and not kwargs["paths"]:
                raise BulkLabelingError(_missing_message(missing))

            result = yield from upload.iter_upload(
                ctx.dataset, user=_common.user_of(ctx), **kwargs
            )
            if missing:
                result["skipped"] = list(result.get("skipped") or []) + [
                    {"path": "(a file from your computer)",
                     "reason": _missing_message(1)}
                ] * missing
            return result

        return _common.execute_steps(ctx, self, steps, after=_show_batch)

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("operation_id", label="Operation id")
        outputs.int("added", label="Samples added")
        outputs.list(
            "skipped",
            types.Object(),
            label="Skipped files",
            view=types.TableView(
                columns=[
                    types.Column("path", label="Path"),
                    types.Column("reason", label="Reason"),
                ]
            ),
        )
        return types.Property(outputs)
