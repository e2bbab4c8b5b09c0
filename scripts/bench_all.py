"""Runs every benchmark of the repo and writes ONE results table.

Each benchmark script (``scripts/bench_label.py``, ``bench_metadata.py``,
``bench_upload.py``, ``bench_embeddings.py``, ``bench_query.py``,
``bench_scale.py``: whichever exist) runs in a subprocess of its own, with
options sized to finish on a small machine (``--profile quick``) or its own
defaults (``--profile full``). Their printed tables are collected into a
"## Summary" section at the top of docs/BENCHMARKS.md (the newest run
replaces the previous summary): our time, each baseline's time and the ratio
side by side, the required ratio, each benchmark's peak memory, the date and
the machine. The journal's overhead is the label benchmark's "same writes,
no journal" row. The 1,000,000-sample run (bench_scale.py) follows the
table. With ``--record`` each script also appends its detailed table to its
own section below (their history).

Usage::

    .venv/bin/python scripts/bench_all.py                  # everything, full size
    .venv/bin/python scripts/bench_all.py --profile quick  # minutes, smaller sizes
    .venv/bin/python scripts/bench_all.py --only label,scale --no-write

Every benchmark runs in a database of its own (a temporary embedded mongod),
never the user's; set ``BENCH_DATABASE_URI=mongodb://...`` to run them all
against an external MongoDB server or cluster instead.
"""

import argparse
import datetime
import os
import pathlib
import re
import subprocess
import sys
import threading
import time

SCRIPTS_DIR = pathlib.Path(__file__).resolve().parent
REPO = SCRIPTS_DIR.parent
RESULTS = REPO / "docs" / "BENCHMARKS.md"

#: (name, script, options per profile). Options a script does not list in
#: its --help are dropped, so the suite keeps running while scripts change
BENCHMARKS = [
    ("label", "bench_label.py", {
        "full": ["--samples", "100000", "--rounds", "3"],
        "quick": ["--samples", "100000", "--rounds", "1"],
        "smoke": ["--samples", "5000", "--rounds", "1", "--skip-slow"],
    }),
    ("metadata", "bench_metadata.py", {
        "full": ["--samples", "100000", "--rounds", "3"],
        "quick": ["--samples", "100000", "--rounds", "1"],
        "smoke": ["--samples", "5000", "--rounds", "1", "--skip-existing"],
    }),
    ("upload", "bench_upload.py", {
        "full": ["--files", "10000", "--rounds", "2"],
        "quick": ["--files", "2000", "--rounds", "1"],
        "smoke": ["--files", "200", "--rounds", "1"],
    }),
    ("embeddings", "bench_embeddings.py", {
        "full": ["--images", "192", "--rounds", "2"],
        "quick": ["--images", "96", "--rounds", "1"],
        "smoke": ["--images", "32", "--rounds", "1", "--skip-fiftyone-default"],
    }),
    ("query", "bench_query.py", {
        "full": ["--sizes", "100000", "1000000", "--queries", "20"],
        "quick": ["--sizes", "100000", "1000000", "--queries", "10"],
        "smoke": ["--sizes", "10000", "--queries", "3"],
    }),
    ("scale", "bench_scale.py", {
        "full": ["--sizes", "100000,300000,1000000"],
        "quick": ["--sizes", "100000,300000,1000000"],
        "smoke": ["--sizes", "10000,30000"],
    }),
]

SUMMARY_HEADING = "## Summary"
TITLE = "# Benchmark results"


def supported_options(script, options):
    """Keeps the options (and their values) that the script's --help
    lists."""
    if not options:
        return []
    try:
        help_text = subprocess.run(
            [sys.executable, str(script), "--help"], capture_output=True,
            text=True, timeout=120,
        ).stdout
    except subprocess.TimeoutExpired:
        help_text = ""
    kept = []
    i = 0
    while i < len(options):
        flag = options[i]
        value = []
        j = i + 1
        while j < len(options) and not options[j].startswith("--"):
            value.append(options[j])
            j += 1
        if re.search(r"(^|[\s\[,])%s\b" % re.escape(flag), help_text):
            kept += [flag] + value
        i = j
    return kept


def run_script(script, args, log_dir, timeout):
    """Runs one benchmark; returns (exit code, stdout, seconds, peak RSS MB
    of the script's process tree as the kernel reports it)."""
    cmd = [sys.executable, str(script)] + args
    print("\n$ %s" % " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    log_path = log_dir / (script.stem + ".log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                cwd=str(REPO))
        out = []
        watchdog = threading.Timer(timeout, proc.kill) if timeout else None
        if watchdog:
            watchdog.start()
        for line in proc.stdout:
            out.append(line)
            log.write(line)
            if line.strip():
                print("  " + line.rstrip(), flush=True)
        _, status, usage = os.wait4(proc.pid, 0)
        if watchdog:
            watchdog.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return (proc.returncode, "".join(out), time.perf_counter() - start,
            usage.ru_maxrss / 1024)


_RSS = re.compile(r"peak RSS (?:of this run )?([\d,.]+) ?MB")


def parse_tables(output):
    """The markdown tables a benchmark printed: ``[{"title", "info",
    "header", "rows", "peak_rss_mb", "text"}]``."""
    tables = []
    lines = output.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("### "):
            i += 1
            continue
        title = lines[i][4:].strip()
        j = i + 1
        info = []
        while j < len(lines) and not lines[j].startswith("|"):
            if lines[j].startswith("### "):
                break
            if lines[j].strip():
                info.append(lines[j].strip())
            j += 1
        body = []
        while j < len(lines) and lines[j].startswith("|"):
            body.append(lines[j])
            j += 1
        if len(body) >= 2:
            header = _cells(body[0])
            rows = [_cells(r) for r in body[2:]]
            rss = None
            for line in info:
                m = _RSS.search(line)
                if m:
                    rss = float(m.group(1).replace(",", ""))
            tables.append({
                "title": title, "info": " ".join(info), "header": header,
                "rows": rows, "peak_rss_mb": rss,
                "text": "\n".join(["#### " + title, ""]
                                  + ([" ".join(info), ""] if info else [])
                                  + body),
            })
        i = j
    return tables


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _unit(header_cell):
    m = re.search(r"\(([^)]*)\)", header_cell)
    return m.group(1) if m else ""


def _number(text):
    m = re.search(r"-?[\d,]*\.?\d+", text or "")
    return float(m.group(0).replace(",", "")) if m else None


def _split_value(text):
    """'12.5 ms' -> ('12.5', 'ms')."""
    m = re.match(r"\s*(-?[\d,]*\.?\d+)\s*(.*)$", text or "")
    return (m.group(1), m.group(2).strip()) if m else (text, "")


def comparisons(table):
    """Reads a benchmark's table as rows of ``{"ours", "ours_value", "base",
    "base_value", "unit", "ratio", "required", "rss"}``, or returns None for
    a table of another kind (included verbatim in the summary).

    Understood layouts: ``_bench.format_table`` (ours | ours (s) | baseline
    | baseline (s) | ratio | required), a throughput table (path |
    images/s | ours vs it | required, first row ours) and a latency table
    (one row per size, with "ours: X" / "FiftyOne: X" column pairs).
    """
    h = [c.lower() for c in table["header"]]
    rows = []
    if len(h) >= 5 and h[0].startswith("ours") and h[2].startswith("baseline"):
        unit = _unit(table["header"][1]) or "s"
        for cells in table["rows"]:
            cells = cells + [""] * (6 - len(cells))
            rows.append({"ours": cells[0], "ours_value": cells[1],
                         "base": cells[2], "base_value": cells[3],
                         "unit": unit, "ratio": cells[4],
                         "required": cells[5], "rss": None})
        return rows

    if len(h) >= 3 and "ours vs" in h[2] and table["rows"]:
        unit = table["header"][1]
        ours = table["rows"][0]
        for cells in table["rows"][1:]:
            cells = cells + [""] * (4 - len(cells))
            rows.append({"ours": ours[0].replace("**", ""),
                         "ours_value": ours[1], "base": cells[0],
                         "base_value": cells[1], "unit": unit,
                         "ratio": cells[2], "required": cells[3], "rss": None})
        return rows

    ours_cols = [i for i, c in enumerate(h) if c.startswith("ours:")]
    if ours_cols and len(ours_cols) * 2 <= len(h):
        rss_col = next((i for i, c in enumerate(h) if "rss" in c), None)
        theirs = [i for i, c in enumerate(h)
                  if ":" in c and not c.startswith("ours:")
                  and not c.startswith("ours")]
        for cells in table["rows"]:
            for o, b in zip(ours_cols, theirs):
                ours_v, unit = _split_value(cells[o])
                base_v, _ = _split_value(cells[b])
                a, c = _number(ours_v), _number(base_v)
                rows.append({
                    "ours": "%s (%s %s)" % (
                        table["header"][o].split(":", 1)[1].strip(), cells[0],
                        table["header"][0]),
                    "ours_value": ours_v,
                    "base": table["header"][b],
                    "base_value": base_v, "unit": unit,
                    "ratio": "%.2f×" % (a / c) if a is not None and c else "",
                    "required": "",
                    "rss": _number(cells[rss_col]) if rss_col is not None else None,
                })
        return rows

    return None


def short_title(title):
    return title.split(" (", 1)[0]


def summary_rows(name, table, rows, rss_fallback):
    """Markdown rows of the summary table for one benchmark table."""
    lines = []
    for r in rows:
        rss = r["rss"] or table["peak_rss_mb"] or rss_fallback
        label = "%s: %s" % (name, short_title(table["title"]))
        if "no journal" in r["base"].lower():
            label += " — **journaling overhead**"
        lines.append("| %s | %s | %s %s | %s | %s %s | %s | %s | %s |" % (
            label, r["ours"], r["ours_value"], r["unit"], r["base"],
            r["base_value"], r["unit"], r["ratio"], r["required"] or "—",
            "%.0f" % rss if rss else "?"))
    return lines


def build_summary(runs, profile, started, machine):
    lines = [
        SUMMARY_HEADING,
        "",
        "Latest `scripts/bench_all.py --profile %s` run: %s, %s. Rerun with "
        "`.venv/bin/python scripts/bench_all.py` (see docs/SCALE.md)."
        % (profile, started.strftime("%Y-%m-%d %H:%M"), machine),
        "",
        "| benchmark | ours | ours: measured | baseline | baseline: measured "
        "| ratio ours/baseline | required | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    extra = []
    status = []
    for run in runs:
        if run["skipped"]:
            status.append("| %s | not run: %s | | |" % (run["name"], run["skipped"]))
            continue
        status.append("| %s | exit %d | %.0f s | %.0f MB |" % (
            run["name"], run["code"], run["seconds"], run["rss_mb"]))
        for table in run["tables"]:
            rows = comparisons(table)
            if rows:
                lines += summary_rows(run["name"], table, rows, run["rss_mb"])
            else:
                extra.append(table["text"])
        if not run["tables"]:
            lines.append("| %s | *(no table printed; exit %d, see %s)* | | | | "
                         "| | %.0f |" % (run["name"], run["code"], run["log"],
                                         run["rss_mb"]))
    lines.append("")
    lines += ["Ratio: ours / baseline of the measured quantity (a time: lower "
              "is better; images/s: higher is better). "
              "Peak RSS: as each script reports for its own process "
              "(or, if it does not, the kernel's figure for the script's "
              "process); the MongoDB server is a separate process and not "
              "included.", ""]
    for text in extra:
        lines += [text, ""]
    lines += ["#### Runs", "", "| benchmark | result | wall time | peak RSS |",
              "|---|---|---|---|"] + status + [""]
    return "\n".join(lines)


def write_summary(summary):
    """Puts the summary at the top of docs/BENCHMARKS.md, replacing the
    previous one and keeping every other section."""
    text = RESULTS.read_text() if RESULTS.exists() else TITLE + "\n"
    if SUMMARY_HEADING in text:
        head, _, tail = text.partition(SUMMARY_HEADING)
        nxt = tail.find("\n## ")
        tail = tail[nxt + 1:] if nxt != -1 else ""
    else:
        if text.startswith(TITLE):
            head, tail = TITLE + "\n", text[len(TITLE):].lstrip("\n")
        else:
            head, tail = TITLE + "\n", text
    head = head.rstrip("\n") + "\n\n"
    RESULTS.write_text(head + summary.rstrip("\n") + "\n\n" + tail)


def machine():
    sys.path.insert(0, str(SCRIPTS_DIR))
    from _bench import machine as _machine  # noqa: E402

    return _machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=("full", "quick", "smoke"),
                        default="full",
                        help="benchmark sizes: full (the documented sizes), "
                        "quick (smaller runs; the 1M-sample scale run is "
                        "kept) or smoke (tiny: checks that the suite runs; "
                        "the numbers mean nothing)")
    parser.add_argument("--only", help="comma-separated benchmark names: %s"
                        % ", ".join(b[0] for b in BENCHMARKS))
    parser.add_argument("--skip", help="comma-separated benchmark names")
    parser.add_argument("--no-write", action="store_true",
                        help="print the summary; leave docs/BENCHMARKS.md alone")
    parser.add_argument("--no-record", action="store_true",
                        help="don't pass --record to the scripts")
    parser.add_argument("--timeout", type=int, default=3600,
                        help="seconds per benchmark script (default 3600)")
    args = parser.parse_args()

    only = set(args.only.split(",")) if args.only else None
    skip = set(args.skip.split(",")) if args.skip else set()
    started = datetime.datetime.now()
    log_dir = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / (
        "bench_all_%s" % started.strftime("%Y%m%d_%H%M%S"))
    log_dir.mkdir(parents=True, exist_ok=True)

    runs = []
    for name, script_name, profiles in BENCHMARKS:
        if (only and name not in only) or name in skip:
            continue
        script = SCRIPTS_DIR / script_name
        run = {"name": name, "skipped": None, "tables": [], "code": None,
               "seconds": 0.0, "rss_mb": 0.0, "log": None}
        runs.append(run)
        if not script.exists():
            run["skipped"] = "scripts/%s does not exist" % script_name
            print("\n%s: %s" % (name, run["skipped"]), flush=True)
            continue
        options = list(profiles[args.profile])
        if not args.no_record:
            options.append("--record")
        options = supported_options(script, options)
        code, out, seconds, rss = run_script(script, options, log_dir,
                                             args.timeout)
        run.update(code=code, seconds=seconds, rss_mb=rss,
                   tables=parse_tables(out), log=str(log_dir / (script.stem + ".log")))

    summary = build_summary(runs, args.profile, started, machine())
    print("\n" + summary)
    if not args.no_write:
        write_summary(summary)
        print("wrote the summary to %s (logs in %s)" % (
            RESULTS.relative_to(REPO), log_dir))
    failed = [r["name"] for r in runs if r["code"] not in (None, 0)]
    if failed:
        print("benchmarks that failed or missed a requirement: %s"
              % ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
