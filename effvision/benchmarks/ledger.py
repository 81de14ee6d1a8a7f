"""The results ledger: every benchmark run's figures as one small JSON file in bench/results/,
and the README's figure tables generated from it.

    python -m effvision.benchmarks.ledger add results/<stamp>/ledger.json   # file a gpu_bench call's results
    python -m effvision.benchmarks.ledger readme [--check]                  # rewrite (or check) README tables

An entry: ``{"date", "machine", "command", "source", "environment": {versions, git_sha,
hardware}, "sections": {name: {"status", "rows": [...]}}}``. The README is only touched between
``<!-- ledger:NAME -->`` and ``<!-- /ledger:NAME -->``; each such block shows, per machine kind,
the latest entry with that section, with its date and command, rendered by the section's own
markdown function. A section no entry has measured shows as unmeasured.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .registry import sections

__all__ = ["LEDGER_DIR", "machine_kind", "make_entry", "load_ledger", "add_entry", "render_block", "update_readme",
           "quickstart_markdown"]

REPO = Path(__file__).resolve().parents[2]
LEDGER_DIR = REPO / "bench" / "results"
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


def load_ledger(root: Path = LEDGER_DIR) -> list[dict[str, Any]]:
    """Every entry, oldest first (by date, then file name)."""
    entries = []
    for p in sorted(root.glob("*.json")):
        e = json.loads(p.read_text())
        e["_file"] = p.name
        entries.append(e)
    return sorted(entries, key=lambda e: (e["date"], e["_file"]))


def add_entry(path: Path, root: Path = LEDGER_DIR) -> Path:
    """Copy a gpu_bench ledger.json into the ledger as <date>-<machine>[-N].json."""
    text = Path(path).read_text()
    if len(text.encode()) > MAX_BYTES:
        raise ValueError(f"{path} is {len(text.encode())} bytes; the ledger takes entries up to {MAX_BYTES}")
    e = json.loads(text)
    root.mkdir(parents=True, exist_ok=True)
    dest, n = root / f"{e['date']}-{e['machine']}.json", 2
    while dest.exists():
        dest, n = root / f"{e['date']}-{e['machine']}-{n}.json", n + 1
    dest.write_text(json.dumps(e, indent=1) + "\n")
    return dest


# ------------------------------------------------------------------------------------------ tables
def quickstart_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """scripts/demo.sh's figures (a CPU run of recipes/quickstart.yaml)."""
    lines = ["| model | params | GMACs | epochs | training time | test top-1 | bench batch 32: torch / onnxruntime |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_m']:.2f} M | {r['gmacs']:.3f} | {r['epochs']} | "
                     f"{r['train_time_s']:.0f} s ({r['train_img_per_s']:,.0f} img/s) | {r['top1']:.2f}% | "
                     f"{r['bench_torch_img_s']:,.0f} / {r['bench_ort_img_s']:,.0f} img/s |")
    return lines


def _markdown_of(section: str) -> Callable[[list[dict[str, Any]]], list[str]]:
    if section == "quickstart":
        return quickstart_markdown
    return sections()[section].markdown


def _measured(e: dict[str, Any], section: str) -> bool:
    s = e.get("sections", {}).get(section)
    return bool(s and s.get("status") == "ok" and s.get("rows"))


def _caption(e: dict[str, Any]) -> str:
    hw, v = e["environment"].get("hardware", {}), e["environment"].get("versions", {})
    where = hw["gpu"]["name"] if hw.get("gpu") else f"{hw.get('cpu', 'CPU')}, {hw.get('cpu_count')} cores"
    versions = "".join(f", {k} {v[k]}" for k in ("torch", "timm") if v.get(k))
    return f"_{where}, {e['date']}{versions}: `{e['command']}`; source: {e['source']}_"


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
        out += [_caption(e), "", *_markdown_of(name)(e["sections"][name]["rows"]), ""]
    return "\n".join(out[:-1]) + "\n"


def update_readme(text: str, entries: list[dict[str, Any]]) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render_block(m.group("name"), entries) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="file a gpu_bench ledger.json into bench/results/")
    a.add_argument("file", type=Path)
    r = sub.add_parser("readme", help="regenerate the README's ledger tables")
    r.add_argument("--readme", type=Path, default=REPO / "README.md")
    r.add_argument("--check", action="store_true", help="exit 1 if a table disagrees with the ledger")
    args = p.parse_args(argv)
    if args.cmd == "add":
        print(add_entry(args.file))
        return 0
    text = args.readme.read_text()
    new = update_readme(text, load_ledger())
    if args.check:
        if new != text:
            names = [m.group("name") for m in BLOCK.finditer(text) if m.group(0) not in new]
            print(f"ledger: README tables differ from bench/results: {', '.join(names)} "
                  "(run python -m effvision.benchmarks.ledger readme)", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
