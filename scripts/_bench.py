"""Shared set-up for the benchmark scripts. Import it before fiftyone: it
points FiftyOne at a database of its own, so benchmarks never touch a user's
datasets (unless BENCH_DATABASE_URI names a server to use)."""

import datetime
import os
import pathlib
import platform
import resource
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "BENCHMARKS.md"

os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
os.environ["FIFTYONE_SHOW_PROGRESS_BARS"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["FIFTYONE_DATABASE_NAME"] = "bulk_labeling_bench"
if os.environ.get("BENCH_DATABASE_URI"):
    os.environ["FIFTYONE_DATABASE_URI"] = os.environ["BENCH_DATABASE_URI"]
else:
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    import private_mongod

    os.environ.pop("FIFTYONE_DATABASE_URI", None)
    private_mongod.isolate(tempfile.mkdtemp(prefix="bulk_labeling_bench_"))

from bulk_labeling.testing import insert_bare_samples  # noqa: E402,F401


def warm_up():
    """One small journaled operation of each kind, so that first-call costs
    (the journal's indexes, imports, connections) stay out of the timings."""
    import fiftyone as fo

    import bulk_labeling as bl

    dataset = fo.Dataset()
    insert_bare_samples(dataset, 1000)
    bl.label(dataset, add=["warm", "up"], progress=False)
    bl.label(dataset, remove=["warm"], progress=False)
    bl.edit_metadata(dataset, {"warm": {"up": 1}}, progress=False)
    dataset.delete()


def settle():
    """Flushes the set-up's writes to disk (a WiredTiger checkpoint), so
    that no checkpoint of them lands inside the operation timed next."""
    from bulk_labeling.core import database as db

    db.get_db().client.admin.command("fsync")


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return "%d cores (%s), %.0f GiB, %s" % (os.cpu_count(), cpu, mem, platform.platform())


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_table(title, rows, columns):
    """rows: (ours label, ours seconds, baseline label, baseline seconds,
    required max ratio or None[, ratio]); the ratio defaults to ours /
    baseline (pass it when it is, e.g., a median of per-round ratios)."""
    lines = [
        "### %s" % title,
        "",
        "%s; %s; peak RSS of this run %.0f MB" % (
            datetime.date.today().isoformat(), machine(), peak_rss_mb()),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for ours, t_ours, base, t_base, required, *ratio in rows:
        if ratio:
            ratio = ratio[0]
        else:
            ratio = t_ours / t_base if t_base else float("nan")
        verdict = ""
        if required is not None:
            verdict = "≤ %.1f× %s" % (required, "✅" if ratio <= required else "❌")
        lines.append("| %s | %.2f | %s | %.2f | %.2f× | %s |" % (
            ours, t_ours, base, t_base, ratio, verdict))
    return "\n".join(lines) + "\n"


def record(section, table):
    """Appends a table under '## <section>' in docs/BENCHMARKS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    heading = "## %s" % section
    if heading not in text:
        text = text.rstrip("\n") + "\n\n%s\n" % heading
    head, _, tail = text.partition(heading)
    # Insert right after the heading's existing entries
    next_section = tail.find("\n## ")
    if next_section == -1:
        tail = tail.rstrip("\n") + "\n\n" + table
    else:
        tail = tail[:next_section].rstrip("\n") + "\n\n" + table + tail[next_section:]
    RESULTS.write_text(head + heading + tail)
