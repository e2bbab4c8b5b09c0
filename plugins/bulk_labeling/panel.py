"""The "Bulk Labeling" panel of the FiftyOne App, and the operator that opens
it from the grid's actions and the operator browser.

The panel renders and calls the plugin's operators; it never writes. Heavy
work always runs through an operator (``ctx.prompt``), with the operator's
own form, progress bar, journal and undo. The only database work the panel
does itself is cheap reads through the core's read-only functions (counts,
:func:`bulk_labeling.core.concepts.list_concepts`,
:func:`bulk_labeling.core.history.list_operations`, the similarity scores of
the results of a smart search), in its event handlers and never in
:meth:`BulkLabelingPanel.render`, which only reads the panel's state.
"""

import fiftyone.core.stages as fos
import fiftyone.core.view as fov
import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone import ViewField as F

from .core import concepts as conc
from .core import history
from .core import similarity as sim
from .core.errors import BulkLabelingError

PLUGIN = "@bulk-labeling/bulk_labeling"
PANEL_NAME = "bulk_labeling_panel"

#: Above this many targeted samples, an apply first shows the operator's
#: form with its dry-run counts ("N targeted, M will change")
LARGE_TARGET = 500

#: How many "Label as" quick buttons (the most used concepts)
QUICK_CONCEPTS = 6

#: How many concepts the bar chart shows (the most used ones)
CHART_CONCEPTS = 25

#: How many recent operations the History section lists
HISTORY_LIMIT = 8

#: How many candidates a smart search asks for
SEARCH_K = 50

#: The operators the panel calls, by section
OPERATORS = {
    "label_as": "Label as...",
    "manage_concepts": "Manage concepts",
    "undo_bulk_operation": "Undo",
    "resume_bulk_operation": "Resume",
    "edit_metadata": "Edit metadata",
    "set_metadata_schema": "Metadata schema",
    "set_geolocation": "Geolocation",
    "upload_with_concepts": "Upload with concepts",
    "find_similar": "Find similar",
    "build_similarity_index": "Build similarity index",
}

_UNDOABLE = (history.APPLIED, history.PENDING)

SCORE_FIELD = sim.SCORE_FIELD


def uri(name):
    """The URI of one of the plugin's operators."""
    return "%s/%s" % (PLUGIN, name)


def _registered():
    """The names of the plugin's operators that are registered now."""
    try:
        from fiftyone.operators.registry import OperatorRegistry

        prefix = PLUGIN + "/"
        return sorted(
            op.uri[len(prefix):]
            for op in OperatorRegistry().list_operators()
            if op.uri.startswith(prefix)
        )
    except Exception:
        return []


def _search_parts(view):
    """Splits a smart-search result view (the ``Select(ordered)`` and
    ``SetField("similarity")`` stages that ``find_similar`` appends) into
    the serialized stages of the view it searched and of the results.

    Returns:
        ``(base_stages, result_stages)``, or ``(None, None)``
    """
    stages = list(getattr(view, "_stages", None) or [])
    if (
        len(stages) >= 2
        and isinstance(stages[-1], fos.SetField)
        and stages[-1].field == SCORE_FIELD
        and isinstance(stages[-2], fos.Select)
    ):
        serialized = view._serialize(include_uuids=False)
        return serialized[:-2], serialized

    return None, None


def _plural(count, noun):
    return "%s %s%s" % (format(count, ","), noun, "" if count == 1 else "s")


class BulkLabelingPanel(foo.Panel):
    """Counts, concepts, metadata, smart search and history, one or two
    clicks away."""

    @property
    def config(self):
        return foo.PanelConfig(
            name=PANEL_NAME,
            label="Bulk Labeling",
            # FiftyOne 1.22's panel tabs only draw Material icon names: a
            # plugin-relative path (/assets/...) renders no icon there
            icon="sell",
            surfaces="grid",
            help_markdown=(
                "Label many samples at once: quick **Label as** buttons for "
                "the selection (or the whole view when nothing is "
                "selected), metadata, smart search and an undoable history "
                "of every bulk operation."
            ),
        )

    # ----------------------------------------------------------------- events

    def on_load(self, ctx):
        ctx.panel.set_state("registered", _registered())
        self._refresh(ctx)

    def on_change_dataset(self, ctx):
        ctx.panel.set_state("search", None)
        self._refresh(ctx)

    def on_change_view(self, ctx):
        self._refresh_counts(ctx)
        self._refresh_concepts(ctx)
        self._refresh_search(ctx)

    def on_change_selected(self, ctx):
        self._refresh_counts(ctx)

    def refresh(self, ctx):
        """The Refresh button, and the callback of every operator the panel
        runs."""
        ctx.panel.set_state("registered", _registered())
        self._refresh(ctx)

    def on_operation_error(self, ctx):
        self._refresh(ctx)

    # ------------------------------------------------------------ reads only

    def _refresh(self, ctx):
        self._refresh_counts(ctx)
        self._refresh_concepts(ctx)
        self._refresh_history(ctx)
        self._refresh_search(ctx)

    def _refresh_counts(self, ctx):
        if ctx.dataset is None:
            ctx.panel.set_state("counts", None)
            return

        ctx.panel.set_state(
            "counts",
            {
                "selected": len(ctx.selected or []),
                "view": ctx.view.count(),
                "dataset": ctx.dataset.count(),
            },
        )

    def _field(self, ctx):
        return ctx.panel.get_state("field") or conc.DEFAULT_FIELD

    def _refresh_concepts(self, ctx):
        if ctx.dataset is None:
            ctx.panel.set_state("concepts", [])
            return

        try:
            concepts = conc.list_concepts(ctx.view, field=self._field(ctx))
            error = None
        except BulkLabelingError as e:
            concepts, error = [], str(e)

        ctx.panel.set_state("concepts", concepts)
        ctx.panel.set_state("concepts_error", error)

    def _refresh_history(self, ctx):
        if ctx.dataset is None:
            ctx.panel.set_state("operations", [])
            return

        operations = history.list_operations(ctx.dataset, limit=HISTORY_LIMIT)
        ctx.panel.set_state(
            "operations",
            [
                {
                    "operation_id": op["operation_id"],
                    "type": op["type"],
                    "status": op["status"],
                    "changed": op["changed"],
                    "matched": op["matched"],
                    "started_at": op["started_at"],
                    "summary": _describe_operation(op),
                }
                for op in operations
            ],
        )
        ctx.panel.set_state(
            "pending", len(history.pending_operations(ctx.dataset))
        )

    def _refresh_search(self, ctx):
        """Notices smart-search results in the current view (whoever ran the
        search: the panel, the grid or the sample viewer) and reads their
        similarity scores once."""
        base, results = _search_parts(ctx.view)
        if results is None:
            ctx.panel.set_state("search", None)
            return

        search = ctx.panel.get_state("search") or {}
        if results in (search.get("results"), search.get("shown")):
            return  # the same search, possibly cut to its top k by the panel

        scores = ctx.view.values(SCORE_FIELD)
        ctx.panel.set_state(
            "search",
            {
                "base": base,
                "results": results,
                "shown": results,
                "scores": [round(s, 4) for s in scores if s is not None],
                "k": len(scores),
            },
        )

    # ---------------------------------------------------------- user actions

    def _prompt(self, ctx, name, params=None, skip_prompt=False):
        ctx.prompt(
            uri(name),
            params=params or {},
            skip_prompt=skip_prompt,
            on_success=self.refresh,
            on_error=self.on_operation_error,
        )

    def open_operator(self, ctx):
        """Opens one of the plugin's operator forms (button params:
        ``operator`` and optional ``params``)."""
        name = ctx.params.get("operator")
        if name not in OPERATORS:
            ctx.ops.notify("Unknown operator %r" % name, variant="error")
            return

        self._prompt(ctx, name, params=ctx.params.get("operator_params"))

    def quick_label(self, ctx):
        """Adds one concept to the selection, or to the view when nothing is
        selected; large targets first show label_as's dry-run counts."""
        concept = ctx.params.get("concept")
        counts = ctx.panel.get_state("counts") or {}
        target = counts.get("selected") or counts.get("view") or 0
        self._prompt(
            ctx,
            "label_as",
            params={
                "mode": "add",
                "concepts": [concept],
                "field": self._field(ctx),
            },
            skip_prompt=target <= LARGE_TARGET,
        )

    def on_concept_click(self, ctx):
        """A bar of the chart: shows the samples that hold that concept."""
        concept = ctx.params.get("x") or ctx.params.get("label")
        if not concept:
            return

        field = self._field(ctx)
        ctx.ops.set_view(
            ctx.view.match(
                F("%s.classifications.label" % field).contains(concept)
            )
        )

    def search_selected(self, ctx):
        """Smart search from the selected sample(s)."""
        self._prompt(
            ctx, "find_similar", params={"k": SEARCH_K}, skip_prompt=True
        )

    def search_text(self, ctx):
        """Smart search from the text prompt of the panel."""
        text = (ctx.panel.get_state("search_text") or "").strip()
        if not text:
            ctx.ops.notify("Type what to search for first", variant="warning")
            return

        self._prompt(
            ctx,
            "find_similar",
            params={"text": text, "k": SEARCH_K},
            skip_prompt=True,
        )

    def on_k_change(self, ctx):
        """The k control: the grid shows the top k results, which is what
        "Label results" labels."""
        search = ctx.panel.get_state("search")
        if not search:
            return

        total = len(search["scores"])
        k = _clamp(ctx.params.get("value"), 1, total)
        if k == search.get("k"):
            return  # sliders repeat their value; a new view would re-render

        results = fov.DatasetView._build(ctx.dataset, search["results"])
        if k < total:
            ids = results.values("id")[:k]
            view = sim.result_view(
                fov.DatasetView._build(ctx.dataset, search["base"]),
                ids,
                search["scores"][:k],
            )
        else:
            view = results

        search["k"] = k
        search["shown"] = view._serialize(include_uuids=False)
        ctx.panel.set_state("search", search)
        ctx.ops.set_view(view)

    def label_results(self, ctx):
        """Labels the smart-search results shown in the grid (the current
        view, even when the query samples are still selected)."""
        self._prompt(
            ctx,
            "label_as",
            params={
                "mode": "add",
                "view_target": "CURRENT_VIEW",
                "field": self._field(ctx),
            },
        )

    def clear_search(self, ctx):
        search = ctx.panel.get_state("search")
        ctx.panel.set_state("search", None)
        if search:
            ctx.ops.set_view(
                fov.DatasetView._build(ctx.dataset, search["base"])
            )

    def undo(self, ctx):
        self._prompt(
            ctx,
            "undo_bulk_operation",
            params={"operation_id": ctx.params.get("operation_id")},
        )

    def resume(self, ctx):
        self._prompt(ctx, "resume_bulk_operation")

    # ---------------------------------------------------------------- render

    def render(self, ctx):
        panel = types.Object()
        state = ctx.panel.state
        registered = set(state.registered or [])
        counts = state.counts

        if not counts:
            panel.md("Open a dataset to label its samples.", name="empty")
            return types.Property(panel, view=types.GridView())

        self._render_counts(panel, counts)
        self._render_concepts(panel, state, counts, registered)
        self._render_search(panel, state, registered)
        self._render_metadata(panel, registered)
        self._render_history(panel, state)

        return types.Property(
            panel,
            view=types.GridView(
                orientation="vertical", gap=2, align_x="left", pad=2
            ),
        )

    def _render_counts(self, panel, counts):
        row = panel.h_stack("counts_row", align_y="center", gap=2)
        if counts["selected"]:
            target = "the **%s**" % _plural(counts["selected"], "selected sample")
        else:
            target = "the **current view** (nothing selected)"
        row.md(
            "**%s** selected &middot; **%s** in view &middot; %s in the "
            "dataset  \nLabel as... applies to %s"
            % (
                format(counts["selected"], ","),
                format(counts["view"], ","),
                format(counts["dataset"], ","),
                target,
            ),
            name="counts",
        )
        row.btn(
            "refresh",
            label="Refresh",
            icon="refresh",
            variant="outlined",
            on_click=self.refresh,
        )

    def _render_concepts(self, panel, state, counts, registered):
        section = panel.v_stack("concepts_section", gap=1, variant="outline")
        section.md("##### Concepts", name="concepts_title")
        if state.concepts_error:
            section.view(
                "concepts_error", types.Error(label=state.concepts_error)
            )

        concepts = state.concepts or []
        used = sorted(
            (c for c in concepts if c["count"] or c["negative_count"]),
            key=lambda c: (-c["count"], c["name"]),
        )
        if used:
            shown = used[:CHART_CONCEPTS]
            section.plot(
                "concept_chart",
                data=[
                    {
                        "type": "bar",
                        "x": [c["name"] for c in shown],
                        "y": [c["count"] for c in shown],
                        "name": "samples in view",
                        "marker": {"color": "#FF6D04"},
                    }
                ],
                layout={
                    "height": 180,
                    "margin": {"l": 40, "r": 10, "t": 10, "b": 50},
                    "yaxis": {"title": "samples in view"},
                    "showlegend": False,
                },
                config={"displayModeBar": False},
                on_click=self.on_concept_click,
            )
        elif concepts:
            section.md(
                "No sample of this view holds a concept yet.", name="no_use"
            )
        else:
            section.md(
                "No concepts yet: **Label as...** creates them.",
                name="no_concepts",
            )

        quick = [c["name"] for c in used[:QUICK_CONCEPTS]]
        if not quick:
            quick = [c["name"] for c in concepts[:QUICK_CONCEPTS]]

        target = counts["selected"] or counts["view"]
        if quick:
            label = "Add to the %s:" % (
                _plural(counts["selected"], "selected sample")
                if counts["selected"]
                else "current view (%s)" % _plural(counts["view"], "sample")
            )
            if target > LARGE_TARGET:
                label += " (large: you will see a dry run first)"
            section.md(label, name="quick_title")
            row = section.h_stack("quick", gap=1)
            for i, name in enumerate(quick):
                row.btn(
                    "quick_%d" % i,
                    label="+ %s" % name,
                    variant="outlined",
                    on_click=self.quick_label,
                    params={"concept": name},
                    disabled=not target,
                )

        row = section.h_stack("concept_actions", gap=1)
        self._op_button(row, "label_as", "Label as...", registered,
                        icon="sell", variant="contained")
        self._op_button(row, "manage_concepts", "New concept...", registered,
                        params={"action": "create"}, name="create_concept")
        self._op_button(row, "manage_concepts", "Rename...", registered,
                        params={"action": "rename"}, name="rename_concept")
        self._op_button(row, "manage_concepts", "Delete...", registered,
                        params={"action": "delete"}, name="delete_concept")

    def _render_search(self, panel, state, registered):
        section = panel.v_stack("search_section", gap=1, variant="outline")
        section.md("##### Smart search", name="search_title")
        if "find_similar" not in registered:
            section.md(
                "Smart search needs the *find_similar* operator.",
                name="search_missing",
            )
            return

        counts = state.counts
        row = section.h_stack("search_row", gap=1, align_y="center")
        row.str(
            "search_text",
            label="Text prompt",
            description="e.g. a photo of a red bird",
        )
        row.btn(
            "search_text_btn",
            label="Search",
            icon="search",
            variant="contained",
            on_click=self.search_text,
        )
        row.btn(
            "search_selected_btn",
            label="Similar to the %s"
            % _plural(counts["selected"], "selected sample"),
            icon="image_search",
            variant="outlined",
            on_click=self.search_selected,
            disabled=not counts["selected"],
        )

        search = state.search
        if not search:
            section.md(
                "Results are shown in the grid, most similar first.",
                name="search_hint",
            )
            return

        scores = search.get("scores") or []
        total = len(scores)
        k = _clamp(search.get("k"), 1, total) if total else 0
        cutoff = scores[k - 1] if k else None
        section.plot(
            "score_histogram",
            data=[
                {
                    "type": "histogram",
                    "x": scores[:k],
                    "name": "kept",
                    "marker": {"color": "#FF6D04"},
                    "xbins": _bins(scores),
                },
                {
                    "type": "histogram",
                    "x": scores[k:],
                    "name": "not kept",
                    "marker": {"color": "#9E9E9E"},
                    "xbins": _bins(scores),
                },
            ],
            layout={
                "height": 170,
                "barmode": "stack",
                "margin": {"l": 40, "r": 10, "t": 10, "b": 40},
                "xaxis": {"title": "similarity of the %d candidates" % total},
                "showlegend": False,
            },
            config={"displayModeBar": False},
        )
        if total > 1:
            section.int(
                "k",
                label="Top k",
                default=k,
                min=1,
                max=total,
                view=types.SliderView(),
                on_change=self.on_k_change,
            )

        apply = section.h_stack("apply_row", gap=1, align_y="center")
        apply.md(
            "Apply to all would label **%s** (similarity >= %.3f)"
            % (_plural(k, "sample"), cutoff if cutoff is not None else 0),
            name="apply_count",
        )
        apply.btn(
            "label_results",
            label="Label %s as..." % _plural(k, "result"),
            icon="sell",
            variant="contained",
            on_click=self.label_results,
            disabled=not k,
        )
        apply.btn(
            "clear_search",
            label="Clear search",
            variant="outlined",
            on_click=self.clear_search,
        )

    def _render_metadata(self, panel, registered):
        section = panel.v_stack("metadata_section", gap=1, variant="outline")
        section.md("##### Metadata and upload", name="metadata_title")
        row = section.h_stack("metadata_actions", gap=1)
        self._op_button(row, "edit_metadata", "Edit metadata...", registered,
                        icon="data_object", variant="contained")
        self._op_button(row, "set_metadata_schema", "Metadata schema...",
                        registered, icon="schema")
        self._op_button(row, "set_geolocation", "Geolocation...", registered,
                        icon="place")
        self._op_button(row, "upload_with_concepts", "Upload with concepts...",
                        registered, icon="upload")

    def _render_history(self, panel, state):
        section = panel.v_stack("history_section", gap=1, variant="outline")
        section.md("##### History", name="history_title")
        if state.pending:
            if state.pending == 1:
                message = "1 operation was interrupted: resume or undo it"
            else:
                message = (
                    "%d operations were interrupted: resume or undo them"
                    % state.pending
                )
            section.view("pending_warning", types.Warning(label=message))
            section.btn(
                "resume",
                label="Resume...",
                icon="play_arrow",
                variant="outlined",
                on_click=self.resume,
            )

        operations = state.operations or []
        if not operations:
            section.md("No bulk operation yet.", name="no_history")
            return

        for i, op in enumerate(operations):
            row = section.h_stack("op_%d" % i, gap=1, align_y="center")
            row.md(op["summary"], name="op_text_%d" % i)
            if op["status"] in _UNDOABLE and op["type"] != "undo":
                row.btn(
                    "undo_%d" % i,
                    label="Undo",
                    icon="undo",
                    variant="outlined",
                    on_click=self.undo,
                    params={"operation_id": op["operation_id"]},
                )

    def _op_button(self, row, op_name, label, registered, params=None,
                   name=None, icon=None, variant="outlined"):
        available = op_name in registered
        row.btn(
            name or op_name,
            label=label,
            icon=icon,
            variant=variant,
            on_click=self.open_operator,
            params={"operator": op_name, "operator_params": params or {}},
            disabled=not available,
            title=None if available else "Not available yet",
        )


class OpenBulkLabelingPanel(foo.Operator):
    """Opens the Bulk Labeling panel (grid actions, operator browser)."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="open_bulk_labeling_panel",
            label="Open the Bulk Labeling panel",
            description="Counts, concepts, smart search and undoable history",
            icon="/assets/panel.svg",
            view_target=False,
        )

    def resolve_placement(self, ctx):
        return types.Placement(
            types.Places.SAMPLES_GRID_SECONDARY_ACTIONS,
            types.Button(
                label="Bulk Labeling panel",
                icon="/assets/panel.svg",
            ),
        )

    def execute(self, ctx):
        ctx.ops.open_panel(PANEL_NAME, layout="horizontal", is_active=True)


def _clamp(value, low, high):
    try:
        # sliders can report fractional positions, e.g. 3.97
        value = int(round(float(value)))
    except (TypeError, ValueError):
        return high
    return max(low, min(high, value))


def _bins(scores):
    if not scores:
        return None
    low, high = min(scores), max(scores)
    size = max((high - low) / 20.0, 1e-3)
    return {"start": low - size / 2, "end": high + size / 2, "size": size}


def _describe_operation(op):
    """One line of the History section."""
    params = op.get("params") or {}
    what = op["type"]
    if what == "label_as":
        parts = []
        if params.get("add"):
            parts.append("+" + ", +".join(params["add"]))
        if params.get("remove"):
            parts.append("-" + ", -".join(params["remove"]))
        what = "Label as %s%s" % (
            " ".join(parts), " (negative)" if params.get("negative") else ""
        )
    elif what == "rename_concept":
        what = "Rename %s to %s" % (params.get("old"), params.get("new"))
    elif what == "delete_concept":
        what = "Delete concept %s" % params.get("name")
    else:
        what = what.replace("_", " ").capitalize()

    when = (op.get("started_at") or "")[:19].replace("T", " ")
    status = op["status"]
    return "**%s** &middot; %s changed &middot; %s &middot; %s" % (
        what,
        format(op["changed"] or 0, ","),
        status,
        when,
    )
