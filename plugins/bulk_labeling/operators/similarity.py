"""Operators for smart search: build a CLIP similarity index (in one run or
in delegated shards), find similar samples by sample, image or text."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from ..core import models
from ..core import sharding
from ..core import similarity as sim
from ..core.errors import BulkLabelingError
from . import _common

ICON = "/assets/find_similar.svg"
_HIST_BINS = 40


def _reload_dataset(ctx, result):
    yield ctx.ops.reload_dataset()


def _int_param(ctx, name):
    value = ctx.params.get(name)
    if value is None or value == "":
        return None
    # int() would silently truncate 2.5
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise BulkLabelingError("%s must be an integer" % name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BulkLabelingError("%s must be an integer" % name)


def _backends():
    try:
        import fiftyone.brain as fb

        return sorted(fb.brain_config.similarity_backends)
    except Exception:
        return [sim.DEFAULT_BACKEND]


class BuildSimilarityIndex(foo.Operator):
    """Embeds the dataset's images with an open_clip model and stores them in
    a fiftyone-brain similarity index (text prompts included)."""

    @property
    def config(self):
        return _common.bulk_operator_config(
            name="build_similarity_index",
            label="Build similarity index",
            description="Compute CLIP embeddings (open_clip) and build a "
            "similarity index for smart search",
            icon=ICON,
            dynamic=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        brain_key = ctx.params.get("brain_key") or sim.DEFAULT_BRAIN_KEY
        existing = {}
        if ctx.dataset is not None:
            try:
                existing = {i["brain_key"]: i for i in sim.list_indexes(ctx.dataset)}
            except BulkLabelingError:
                existing = {}

        inputs.str(
            "model", default=models.DEFAULT_MODEL, label="Model",
            description="open_clip architecture (e.g. ViT-B-32), or "
                        "local-dir:/path/to/open_clip/folder",
        )
        inputs.str(
            "pretrained", default=models.DEFAULT_PRETRAINED, label="Weights",
            description="open_clip pretrained tag (e.g. openai), or the path "
                        "of a local checkpoint file on the server",
        )
        inputs.str(
            "model_config", required=False, label="Model config (optional)",
            description="Path of an open_clip JSON config for a custom "
                        "architecture (its file name is the model name)",
        )
        inputs.str(
            "brain_key", default=sim.DEFAULT_BRAIN_KEY, label="Brain key",
        )
        inputs.enum(
            "backend", _backends(), default=sim.DEFAULT_BACKEND,
            label="Backend", description="fiftyone-brain similarity backend",
            view=types.DropdownView(),
        )
        inputs.int("batch_size", required=False, label="Batch size",
                   description="Images per batch (default: 32 on CPU, 64 on GPU)")
        inputs.int("num_workers", required=False, label="Workers",
                   description="Image decoding processes (default: automatic)")
        inputs.enum(
            "device", ["auto", "cpu", "cuda"], default="auto", label="Device",
            description="auto: CUDA when available, else CPU",
            view=types.DropdownView(),
        )
        inputs.enum(
            "precision", list(models.PRECISIONS), default="auto",
            label="Precision",
            description="auto: fp16 on CUDA; bf16 on CPUs that compute it "
                        "natively (about 2x fp32); else fp32",
            view=types.DropdownView(),
        )
        inputs.bool(
            "overwrite", default=False, label="Rebuild from scratch",
            description="Delete the existing index of this brain key first",
        )
        inputs.int(
            "num_shards", default=1, label="Shards",
            description="Split the embedding into this many delegated "
                        "operations, run in parallel by `fiftyone delegated "
                        "launch` workers (Schedule it); run now, the shards "
                        "run one after another",
        )

        if brain_key in existing and not ctx.params.get("overwrite"):
            inputs.view("existing", types.Notice(
                label="Index '%s' exists: only the samples missing from it "
                      "will be embedded, deleted ones dropped" % brain_key))
        if ctx.dataset is not None:
            count = ctx.dataset.count()
            inputs.view("size", types.Notice(
                label="%d image(s). On CPU about 15 images/s in fp32, 30 in "
                      "bf16 (ViT-B-32, 2 cores): "
                      "for more than a few thousand, run it delegated "
                      "(`fiftyone delegated launch`)" % count))

        return types.Property(inputs, view=types.View(label="Build similarity index"))

    def _kwargs(self, ctx):
        device = ctx.params.get("device") or "auto"
        num_shards = _int_param(ctx, "num_shards")
        return dict(
            model=ctx.params.get("model") or models.DEFAULT_MODEL,
            pretrained=ctx.params.get("pretrained") or models.DEFAULT_PRETRAINED,
            model_config=ctx.params.get("model_config") or None,
            brain_key=ctx.params.get("brain_key") or sim.DEFAULT_BRAIN_KEY,
            backend=ctx.params.get("backend") or sim.DEFAULT_BACKEND,
            batch_size=_int_param(ctx, "batch_size"),
            num_workers=_int_param(ctx, "num_workers"),
            device=None if device == "auto" else device,
            overwrite=bool(ctx.params.get("overwrite", False)),
            num_shards=1 if num_shards is None else num_shards,
            precision=ctx.params.get("precision") or "auto",
        )

    def execute(self, ctx):
        def steps():
            if ctx.dataset is None:
                raise BulkLabelingError("No dataset is loaded")
            return sim.iter_build_index(
                ctx.dataset, launch_shards=_shard_launcher(ctx, self),
                **self._kwargs(ctx))

        return _common.execute_steps(ctx, self, steps, after=_reload_dataset)

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("brain_key", label="Brain key")
        outputs.int("num_shards", label="Shards")
        outputs.list("shard_operations", types.String(),
                     label="Delegated shard operations")
        outputs.int("indexed", label="Images in the index")
        outputs.int("added", label="Embedded now")
        outputs.int("removed", label="Deleted samples dropped")
        outputs.int("failed", label="Unreadable images")
        outputs.float("images_per_second", label="Images / s")
        return types.Property(outputs)


def _shard_launcher(ctx, operator):
    """Queues each shard of a sharded build as a delegated
    ``build_similarity_index_shard`` operation, for any worker, when this
    run is itself delegated; None (run them inline) otherwise."""
    if not ctx.delegated:
        return None

    def launch(build_id, num_shards, label):
        from fiftyone.operators.delegated import DelegatedOperationService
        from fiftyone.operators.executor import ExecutionContext

        service = DelegatedOperationService()
        uri = "%s/%s" % (operator.plugin_name, BuildSimilarityIndexShard.NAME)
        ids = []
        for shard in range(num_shards):
            request = {
                "dataset_name": ctx.dataset.name,
                "dataset_id": str(ctx.dataset._doc.id),
                "params": {"build_id": build_id, "shard": shard},
                "request_delegation": True,
                "delegated": True,
            }
            op = service.queue_operation(
                operator=uri,
                label="%s: shard %d / %d" % (label, shard + 1, num_shards),
                delegation_target=ctx.delegation_target,
                context=ExecutionContext(request_params=request),
                metadata={"inputs_schema": None, "outputs_schema": None},
            )
            ids.append(str(op.id))
        return ids

    return launch


class BuildSimilarityIndexShard(foo.Operator):
    """One shard of a sharded ``build_similarity_index``: embeds its part of
    the dataset; the shard that finishes last assembles the index. Queued
    by ``build_similarity_index``, not meant to be run by hand."""

    NAME = "build_similarity_index_shard"

    @property
    def config(self):
        return _common.bulk_operator_config(
            name=self.NAME,
            label="Build similarity index (shard)",
            description="One shard of a sharded similarity-index build",
            icon=ICON,
            unlisted=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.str("build_id", required=True, label="Build id")
        inputs.int("shard", required=True, label="Shard")
        return types.Property(inputs)

    def execute(self, ctx):
        def steps():
            if ctx.dataset is None:
                raise BulkLabelingError("No dataset is loaded")
            return sharding.iter_run_shard(
                ctx.dataset, ctx.params.get("build_id"),
                _int_param(ctx, "shard"),
                operation_id=ctx.request_params.get("run_doc"))

        return _common.execute_steps(ctx, self, steps, after=_reload_dataset)

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.int("added", label="Embedded")
        outputs.int("failed", label="Unreadable images")
        outputs.bool("assembled", label="Assembled the index")
        return types.Property(outputs)


class FindSimilar(foo.Operator):
    """Ranks the samples by similarity to the selected samples, an uploaded
    image or a text prompt, and shows the results as the current view."""

    #: Whether the sample open in the modal is the default query
    modal = False

    @property
    def config(self):
        return foo.OperatorConfig(
            name="find_similar",
            label="Find similar",
            description="Find samples similar to the selection, an image or a text",
            icon=ICON,
            dynamic=True,
            allow_immediate_execution=True,
        )

    def resolve_placement(self, ctx):
        return types.Placement(
            types.Places.SAMPLES_GRID_SECONDARY_ACTIONS,
            types.Button(label="Find similar", icon=ICON, prompt=True),
        )

    def _query(self, ctx):
        """The query's kwargs for :func:`bulk_labeling.core.similarity.search`
        and a description."""
        text = (ctx.params.get("text") or "").strip()
        if text:
            return {"text": text}, 'the text "%s"' % text
        image = ctx.params.get("image")
        if isinstance(image, dict) and image.get("content"):
            return {"image": image}, "the image %s" % (image.get("name") or "")
        ids = _common.param_list(ctx, "query_ids")
        if ids:
            return {"ids": ids}, "%d sample(s)" % len(ids)
        current = ctx.current_sample
        if self.modal and current:
            return {"ids": [current]}, "the sample being viewed"
        if ctx.selected:
            return {"ids": list(ctx.selected)}, "the %d selected sample(s)" % len(ctx.selected)
        if current:
            return {"ids": [current]}, "the sample being viewed"
        return None, None

    def _search_kwargs(self, ctx):
        min_similarity = ctx.params.get("min_similarity")
        if min_similarity == "":
            min_similarity = None
        k = ctx.params.get("k")
        if k in (None, ""):
            # No k: every sample above min_similarity (up to MAX_K)
            k = None if min_similarity is not None else sim.DEFAULT_K
        return dict(
            k=k,
            min_similarity=min_similarity,
            brain_key=ctx.params.get("brain_key") or None,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        view = types.View(label="Find similar")
        if ctx.dataset is None:
            return types.Property(inputs, view=view)

        try:
            indexes = sim.list_indexes(ctx.dataset)
        except BulkLabelingError as e:
            inputs.view("error", types.Error(label=str(e)))
            return types.Property(inputs, view=view)

        if not indexes:
            inputs.view("no_index", types.Error(
                label="This dataset has no similarity index yet",
                description="Run 'Build similarity index' first",
            ))
            return types.Property(inputs, view=view)

        keys = [i["brain_key"] for i in indexes]
        try:
            default_key = sim.resolve_brain_key(ctx.dataset, None)
        except BulkLabelingError:
            default_key = keys[0]
        inputs.enum("brain_key", keys, default=default_key, label="Index",
                    view=types.DropdownView())

        inputs.str("text", required=False, label="Text",
                   description="Search by a text prompt (e.g. 'a red car')")
        inputs.define_property(
            "image", types.UploadedFile(), required=False, label="Image",
            description="Or search by an image",
            view=types.FileView(label="Query image", types=".jpg,.jpeg,.png,.webp,.bmp,.gif"),
        )
        inputs.int("k", default=sim.DEFAULT_K, label="Results (k)",
                   description="How many samples to keep (max %d)" % sim.MAX_K)
        inputs.float("min_similarity", required=False, label="Minimum similarity",
                     description="Keep only samples at least this similar "
                                 "(cosine, -1..1)")

        query, described = self._query(ctx)
        if query is None:
            inputs.view("no_query", types.Warning(
                label="Select samples, type a text or upload an image"))
            return types.Property(inputs, view=view)

        try:
            result = sim.search(_common_view(ctx), with_scores=True,
                                **query, **self._search_kwargs(ctx))
        except BulkLabelingError as e:
            inputs.view("error", types.Error(label=str(e)))
            return types.Property(inputs, view=view)

        _histogram(inputs, result)
        scores = result["scores"]
        message = "Query: %s. k=%s%s keeps %d of %d candidates" % (
            described, result["k"],
            "" if result["min_similarity"] is None
            else ", min similarity %.3f" % result["min_similarity"],
            len(scores), result["candidates"],
        )
        if scores:
            message += " (similarity %.3f to %.3f)" % (scores[-1], scores[0])
        inputs.view("preview", types.Notice(label=message))
        if result["stale"]:
            inputs.view("stale", types.Warning(label=result["stale"]))
        return types.Property(inputs, view=view)

    def execute(self, ctx):
        query, _ = self._query(ctx)
        if query is None:
            raise BulkLabelingError(
                "Nothing to search for: select samples, or give query_ids, "
                "text or image"
            )
        result = sim.search(_common_view(ctx), **query, **self._search_kwargs(ctx))
        ctx.ops.set_view(view=result["view"])
        if self.modal and ctx.current_sample:
            ctx.ops.close_sample()
        return {
            "ids": result["ids"],
            "scores": result["scores"],
            "count": len(result["ids"]),
            "brain_key": result["brain_key"],
            "query": result["query"],
            "stale": result["stale"],
        }

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.int("count", label="Results (now the current view)")
        outputs.str("stale", label="Index status")
        return types.Property(outputs)


class FindSimilarToSample(FindSimilar):
    """"Find similar" on the sample open in the modal."""

    modal = True

    @property
    def config(self):
        return foo.OperatorConfig(
            name="find_similar_to_sample",
            label="Find similar",
            description="Find samples similar to this one",
            icon=ICON,
            dynamic=True,
            allow_immediate_execution=True,
        )

    def resolve_placement(self, ctx):
        return types.Placement(
            types.Places.SAMPLES_VIEWER_ACTIONS,
            types.Button(label="Find similar", icon=ICON, prompt=True),
        )


def _common_view(ctx):
    """The samples to search: the current view (a previous search's result
    view counts as the view it came from), never only the selection, which
    is the query."""
    if ctx.dataset is None:
        raise BulkLabelingError("No dataset is loaded")
    return ctx.view if ctx.view is not None else ctx.dataset


def _histogram(inputs, result):
    import numpy as np

    scores = result.get("all_scores")
    if scores is None or len(scores) == 0:
        return
    scores = np.asarray(scores, dtype=np.float32)
    lo, hi = float(scores.min()), float(scores.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.01, hi + 0.01
    counts, edges = np.histogram(scores, bins=_HIST_BINS, range=(lo, hi))
    centers = ((edges[:-1] + edges[1:]) / 2).round(4).tolist()
    kept = result["scores"]
    threshold = kept[-1] if kept else hi + 1
    in_kept = [c >= threshold for c in centers]
    width = float(edges[1] - edges[0])
    inputs.plot(
        "score_histogram",
        label="Similarity of the %d candidates" % len(scores),
        data=[
            {
                "type": "bar", "name": "kept",
                "x": [c for c, k in zip(centers, in_kept) if k],
                "y": [int(n) for n, k in zip(counts, in_kept) if k],
                "width": width, "marker": {"color": "#FF6D04"},
            },
            {
                "type": "bar", "name": "not kept",
                "x": [c for c, k in zip(centers, in_kept) if not k],
                "y": [int(n) for n, k in zip(counts, in_kept) if not k],
                "width": width, "marker": {"color": "#9E9E9E"},
            },
        ],
        layout={
            "height": 220,
            "margin": {"l": 40, "r": 10, "t": 10, "b": 30},
            "xaxis": {"title": "similarity"},
            "yaxis": {"title": "samples"},
            "bargap": 0,
            "showlegend": True,
        },
    )
