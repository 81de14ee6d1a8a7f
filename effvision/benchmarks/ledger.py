"""The results ledger: every measured figure as one small JSON file in bench/results/, and the
figure tables of the README and the documentation pages generated from it.

    python -m effvision.benchmarks.ledger add results/<stamp>/ledger.json   # file a gpu_bench call's results
    python -m effvision.benchmarks.ledger render [--check]                  # rewrite (or check) the tables

An entry: ``{"date", "machine", "command", "source", "environment": {versions, git_sha,
hardware}, "sections": {name: {"status", "rows": [...], "raw": ...}}}``. ``raw`` holds the
numbers as measured (per-round timings, per-run accuracies) from which the rows were computed;
an entry without them is refused (``entry_problems``), so a figure typed in from elsewhere
cannot pass as measured. Figure scripts file their entry with ``record``; gpu_bench calls with
``add``. A page is only touched between ``<!-- ledger:NAME -->`` and ``<!-- /ledger:NAME -->``;
each such block shows, per machine kind, the latest entry with that section, with its date and
command, rendered by the section's markdown function (a plain table of the rows for sections
without one). A section no entry has measured shows as unmeasured.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from .registry import sections

__all__ = ["LEDGER_DIR", "PAGES", "machine_kind", "make_entry", "entry_problems", "record", "add_arguments",
           "load_ledger", "add_entry",
           "render_block", "update_page", "pages", "table_markdown", "quickstart_markdown"]

REPO = Path(__file__).resolve().parents[2]
LEDGER_DIR = REPO / "bench" / "results"
PAGES = (REPO / "README.md", REPO / "docs")  # where generated blocks may live (docs/: every .md under it)
BLOCK = re.compile(r"(<!-- ledger:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /ledger:(?P=name) -->)", re.S)
MAX_BYTES = 256 * 1024  # the ledger stays small text: an entry larger than this is refused


def machine_kind(env: dict[str, Any]) -> str:
    """'nvidia-h100-80gb-hbm3' for a GPU machine, 'cpu-2core' for a CPU-only one."""
    hw = env.get("hardware", {})
    if hw.get("gpu"):
        return re.sub(r"[^a-z0-9]+", "-", hw["gpu"]["name"].lower()).strip("-")
    return f"cpu-{hw.get('cpu_count', 0)}core"


def make_entry(command: str, source: str) -> dict[str, Any]:
    from ..runinfo import run_environment

    env = run_environment()
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine_kind(env), "command": command, "source": source,
            "environment": env, "sections": {}}


def entry_problems(e: dict[str, Any]) -> list[str]:
    """What keeps ``e`` from being a measured entry (empty when it is one)."""
    problems = [f"no {k}" for k in ("date", "machine", "command", "source", "environment", "sections") if not e.get(k)]
    env = e.get("environment") or {}
    if not env.get("git_sha"):
        problems.append("no git_sha (which code measured it?)")
    if not (env.get("versions") or {}).get("torch"):
        problems.append("no package versions")
    for name, sec in (e.get("sections") or {}).items():
        if sec.get("status") == "ok" and not sec.get("raw"):
            problems.append(f"section {name}: no raw numbers")
    return problems


def record(section: str, rows: list[dict[str, Any]], raw: Any, command: str, source: str,
           root: Path = LEDGER_DIR) -> Path:
    """File one figure script's result as a ledger entry; returns its path.

    Args:
        section: the name of the generated block that shows it (``<!-- ledger:NAME -->``).
        rows: the table's rows (plain JSON values; one dict per row, its keys the column headers).
        raw: the numbers as measured, from which the rows were computed (per-round timings, ...).
        command: the command line that measured it, as a user would type it.
        source: the script that wrote it.
        root: the ledger folder.
    """
    entry = make_entry(command, source)
    entry["sections"] = {section: {"status": "ok", "rows": rows, "raw": raw}}
    problems = entry_problems(entry)
    if problems:
        raise ValueError(f"ledger entry for {section}: {'; '.join(problems)}")
    return _file(entry, root, suffix=f"-{section}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every figure script takes: where its entry goes, or none at all."""
    parser.add_argument("--ledger-dir", type=Path, default=LEDGER_DIR, help="the results ledger (default: bench/results/)")
    parser.add_argument("--no-ledger", action="store_true", help="print only; file no ledger entry")


def load_ledger(root: Path = LEDGER_DIR) -> list[dict[str, Any]]:
    """Every entry, oldest first (by date, then file name)."""
    entries = []
    for p in sorted(root.glob("*.json")):
        e = json.loads(p.read_text())
        e["_file"] = p.name
        entries.append(e)
    return sorted(entries, key=_filed_order)


def _filed_order(e: dict[str, Any]) -> tuple[str, str, int]:
    """Date, then the order of filing: ``X.json`` before ``X-2.json`` before ``X-10.json``."""
    m = re.fullmatch(r"(.*?)(?:-(\d+))?\.json", e["_file"])
    return e["date"], m.group(1), int(m.group(2) or 1)


def add_entry(path: Path, root: Path = LEDGER_DIR) -> Path:
    """Copy a gpu_bench ledger.json into the ledger as <date>-<machine>[-N].json."""
    text = Path(path).read_text()
    if len(text.encode()) > MAX_BYTES:
        raise ValueError(f"{path} is {len(text.encode())} bytes; the ledger takes entries up to {MAX_BYTES}")
    e = json.loads(text)
    problems = entry_problems(e)
    if problems:
        raise ValueError(f"{path} is not a measured entry: {'; '.join(problems)}")
    return _file(e, root)


def _file(e: dict[str, Any], root: Path, suffix: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    stem = f"{e['date']}-{e['machine']}{suffix}"
    dest, n = root / f"{stem}.json", 2
    while dest.exists():  # same day, machine and section again: kept beside, never overwritten
        dest, n = root / f"{stem}-{n}.json", n + 1
    dest.write_text(json.dumps(e, indent=1) + "\n")
    return dest


# ------------------------------------------------------------------------------------------ tables
def quickstart_markdown(rows: list[dict[str, Any]], raw: dict[str, Any] | None = None) -> list[str]:
    """scripts/demo.sh's figures (a CPU run of recipes/quickstart.yaml), with the spread of the bench
    calls (10th-90th percentile latency) where the entry holds them."""
    spread = ""
    if raw and raw.get("bench_times_ms"):
        def p10_p90(times: list[float]) -> str:
            q = statistics.quantiles(times, n=10)
            return f"{q[0]:.1f}-{q[-1]:.1f}"
        t = raw["bench_times_ms"]
        spread = f" ({p10_p90(t['torch'])} / {p10_p90(t['ort'])} ms per batch, p10-p90 of {len(t['ort'])} calls)"
    lines = ["| model | params | GMACs | epochs | training time | test top-1 | bench batch 32: torch / onnxruntime |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_m']:.2f} M | {r['gmacs']:.3f} | {r['epochs']} | "
                     f"{r['train_time_s']:.0f} s ({r['train_img_per_s']:,.0f} img/s) | {r['top1']:.2f}% | "
                     f"{r['bench_torch_img_s']:,.0f} / {r['bench_ort_img_s']:,.0f} img/s{spread} |")
    return lines


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:#.3g}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "" if v is None else str(v)


def table_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """A plain table of ``rows``: the first row's keys are the columns."""
    cols = list(rows[0])
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
            *("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows)]


def quickstart_entry(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The quickstart section's rows and raw numbers from a finished run of recipes/quickstart.yaml
    (scripts/demo.sh)."""
    def summary(stage: str) -> dict[str, Any]:
        found = sorted(Path(run_dir).glob(f"*-{stage}/summary.json"))
        if not found:
            raise ValueError(f"{run_dir} has no finished {stage} stage")
        return json.loads(found[0].read_text())

    train, ev, export, bench = summary("train"), summary("eval"), summary("export"), summary("bench")
    by_backend = {r["backend"]: r for r in bench["results"]}
    row = {"model": train["model"], "params_m": round(train["params_m"], 3), "gmacs": round(train["gmacs"], 4),
           "epochs": int(train["epochs"]), "train_time_s": round(train["train_time_s"], 1),
           "train_img_per_s": round(train["train_img_per_s"]), "top1": round(ev["top1"], 2),
           "bench_torch_img_s": round(by_backend["torch"]["img_per_s"]),
           "bench_ort_img_s": round(by_backend["ort"]["img_per_s"])}
    raw = {"bench_times_ms": {b: r["times_ms"] for b, r in by_backend.items()},
           "bench_batch_size": bench["results"][0]["input_shape"][0], "eval": ev, "train": train,
           "export_parity": export.get("parity")}
    return [row], raw


def _table(name: str, section: dict[str, Any]) -> list[str]:
    """A section's table: demo.sh's own (with the spread from its raw times), a gpu_bench section's
    markdown function, else a plain table of the rows."""
    if name == "quickstart":
        return quickstart_markdown(section["rows"], section.get("raw"))
    registered = sections()
    return (registered[name].markdown if name in registered else table_markdown)(section["rows"])


def _measured(e: dict[str, Any], section: str) -> bool:
    s = e.get("sections", {}).get(section)
    return bool(s and s.get("status") == "ok" and s.get("rows"))


def _caption(e: dict[str, Any]) -> str:
    hw, v = e["environment"].get("hardware", {}), e["environment"].get("versions", {})
    where = hw["gpu"]["name"] if hw.get("gpu") else f"{hw.get('cpu', 'CPU')}, {hw.get('cpu_count')} cores"
    versions = "".join(f", {k} {v[k]}" for k in ("torch", "timm") if v.get(k))
    full = e["environment"].get("git_sha") or ""
    sha = full[:7] + (" with uncommitted changes" if full.endswith("-dirty") else "")
    return f"_{where}, {e['date']}{versions}, commit {sha or 'unknown'}: `{e['command']}`; source: {e['source']}_"


def _status_block(entries: list[dict[str, Any]]) -> list[str]:
    lines = ["| section | what | latest GPU run |", "|---|---|---|"]
    for name, sec in sorted(sections().items(), key=lambda kv: kv[1].priority):
        runs = [e for e in entries if _measured(e, name) and e["environment"].get("hardware", {}).get("gpu")]
        where = f"{runs[-1]['environment']['hardware']['gpu']['name']}, {runs[-1]['date']}" if runs else "**unmeasured**"
        lines.append(f"| {name} | {sec.title} | {where} |")
    return lines


def render_block(name: str, entries: list[dict[str, Any]]) -> str:
    """The text between a block's markers: per machine kind, the latest entry with that section."""
    if name == "gpu-status":
        return "\n".join(_status_block(entries)) + "\n"
    latest: dict[str, dict[str, Any]] = {}
    for e in entries:  # oldest first: later entries replace earlier ones
        if _measured(e, name):
            latest[e["machine"]] = e
    if not latest:
        return f"**unmeasured**: no run in the ledger (bench/results/) has the `{name}` section.\n"
    out = []
    for machine in sorted(latest):
        e = latest[machine]
        out += [_caption(e), "", *_table(name, e["sections"][name]), ""]
    return "\n".join(out[:-1]) + "\n"


def update_page(text: str, entries: list[dict[str, Any]]) -> str:
    """``text`` with every generated block rendered from ``entries``."""
    return BLOCK.sub(lambda m: m.group(1) + render_block(m.group("name"), entries) + m.group(4), text)


def pages(roots: tuple[Path, ...] = PAGES) -> list[Path]:
    """The markdown files that may hold generated blocks."""
    return [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*.md")))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="file a gpu_bench ledger.json into bench/results/")
    a.add_argument("file", type=Path)
    q = sub.add_parser("quickstart", help="file the figures of a finished quickstart run (scripts/demo.sh)")
    q.add_argument("run_dir", type=Path)
    q.add_argument("--ledger-dir", type=Path, default=LEDGER_DIR)
    r = sub.add_parser("render", help="regenerate the tables of the README and docs/ from the ledger")
    r.add_argument("pages", nargs="*", type=Path, help="markdown files (default: README.md and docs/**/*.md)")
    r.add_argument("--check", action="store_true", help="exit 1 if a table disagrees with the ledger")
    args = p.parse_args(argv)
    if args.cmd == "add":
        try:
            print(add_entry(args.file))
        except (OSError, ValueError) as e:
            print(f"ledger: {e}", file=sys.stderr)
            return 2
        return 0
    if args.cmd == "quickstart":
        try:
            rows, raw = quickstart_entry(args.run_dir)
            print(record("quickstart", rows, raw, "scripts/demo.sh",
                         "scripts/demo.sh (effvision.benchmarks.ledger quickstart)", args.ledger_dir))
        except (OSError, ValueError, KeyError) as e:
            print(f"ledger: {args.run_dir}: {e}", file=sys.stderr)
            return 2
        return 0
    entries, stale = load_ledger(), []
    for page in args.pages or pages():
        text = page.read_text()
        new = update_page(text, entries)
        if new == text:
            continue
        if args.check:
            names = [m.group("name") for m in BLOCK.finditer(text) if m.group(0) not in new]
            stale.append(f"{page.name} ({', '.join(names)})")
        else:
            page.write_text(new)
    if stale:
        print(f"ledger: tables differ from bench/results in {'; '.join(stale)} "
              "(run python -m effvision.benchmarks.ledger render)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
