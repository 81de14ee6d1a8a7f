"""The runner behind scripts/gpu_bench.sh: every GPU figure from one call, within a time budget.

    python -m effvision.benchmarks [--budget-s 540] [--sections a,b] [--out DIR] [--check-only] [--toy]

1. An environment check (seconds): torch/timm/triton versions, the GPU, and for every selected
   section its imports, recipes (parsed, model known to timm) and data. Anything missing stops
   the call with one line (exit 2) before the budget is spent.
2. The sections, in ``priority`` order. The budget counts from ``GPU_BENCH_T0`` (set by
   scripts/gpu_bench.sh before unpacking data and wheels) or from the start of this process.
   Each section gets ``share / (sum of the shares still to run)`` of the time left, so time a
   section does not use flows to the later ones; a section whose share is under its ``min_s``
   is skipped (said in the output and its JSON). A section shortens itself to its share
   (``effvision.benchmarks.registry.seconds_left(args)``); one that overruns its share by
   ``GRACE_S`` is stopped (SIGALRM) and recorded as cut off.
3. After each section: ``OUT/<name>.json`` and ``OUT/ledger.json`` (the whole call so far, in the
   results-ledger format of ``effvision.benchmarks.ledger``) and ``OUT/gpu_bench.md``, so a call cut off by
   the device's time limit still returns everything finished before.

Sections are registered by the packages they measure (``effvision.benchmarks.registry``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .registry import Section, sections

__all__ = ["Section", "main", "check_environment", "plan_order"]

GRACE_S = 20.0  # a section past its share by this much is stopped


def plan_order(names: list[str]) -> list[str]:
    secs = sections()
    return sorted(names, key=lambda n: secs[n].priority)


def _has_module(name: str) -> bool:
    if importlib.util.find_spec(name) is not None:
        return True
    # pycocotools may come as a wheel in .data/wheels, unpacked by the detection section itself
    return name == "pycocotools" and any(Path(".data/wheels").glob("pycocotools-*.whl"))


def check_environment(names: list[str], args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """(facts, problems): versions and device, then what each section needs. Imports nothing heavy
    beyond torch/timm; recipes are parsed with the strict recipe parser."""
    import timm
    import torch

    from ..recipe import load_recipe

    facts: dict[str, Any] = {"torch": torch.__version__, "timm": timm.__version__,
                             "python": sys.version.split()[0]}
    problems: list[str] = []
    spec = importlib.util.find_spec("triton")
    facts["triton"] = __import__("triton").__version__ if spec is not None else None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts["gpu"] = {"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                        "capability": f"{p.major}.{p.minor}", "driver_cuda": torch.version.cuda}
    elif not args.toy:
        problems.append("no CUDA GPU visible to torch (use --toy for a CPU run at toy size)")
    for name in names:
        sec = sections()[name]
        for mod in sec.requires:
            if args.toy and mod == "triton":
                continue  # the CPU path runs the PyTorch references
            if not _has_module(mod):
                problems.append(f"section {name} needs the Python module '{mod}' (carry its wheel in .data/wheels)")
        for recipe in sec.recipes:
            try:
                r = load_recipe(recipe)
            except Exception as e:  # ConfigError, YAML or file errors: all one line
                problems.append(f"section {name}: recipe {recipe}: {e}")
                continue
            if r.model.name and not timm.is_model(r.model.name):
                problems.append(f"section {name}: recipe {recipe}: unknown model '{r.model.name}'")
        for d in sec.data:
            path = Path(args.data if d == "cifar10" else args.coco)
            if not path.exists():
                problems.append(f"section {name} needs {d} at {path}")
    return facts, problems


class _CutOff(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _CutOff()


def _run_section(name: str, args: argparse.Namespace, budget_s: float) -> dict[str, Any]:
    """One section with its share; the record written to OUT/<name>.json."""
    sec = sections()[name]
    args.budget_s, args.deadline = budget_s, time.time() + budget_s
    t0 = time.perf_counter()
    record: dict[str, Any] = {"status": "ok", "budget_s": round(budget_s, 1), "rows": []}
    use_alarm = hasattr(signal, "setitimer")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, budget_s + GRACE_S)
    try:
        record["rows"] = sec.run(args)
    except _CutOff:
        record["status"] = "cut off"
        print(f"== {name}: cut off after {budget_s + GRACE_S:.0f} s (its share {budget_s:.0f} s)", flush=True)
    except Exception as e:  # one broken section must not hide the others' figures
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
        print(f"== {name} failed: {record['error']}", flush=True)
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    return record


def markdown(records: dict[str, dict[str, Any]], entry: dict[str, Any]) -> str:
    lines = ["# effvision GPU figures\n", f"{entry['machine']}, {entry['date']}; torch "
             f"{entry['environment']['versions'].get('torch')}, timm {entry['environment']['versions'].get('timm')}; "
             f"command: {entry['command']}\n"]
    for name, rec in records.items():
        sec = sections()[name]
        lines.append(f"## {sec.title or name}\n")  # the markdown function gives the table alone
        if rec["status"] == "skipped":
            lines += [f"skipped: {rec['reason']}", ""]
            continue
        if rec["status"] != "ok":
            lines.append(f"{rec['status']}{': ' + rec['error'] if 'error' in rec else ''}\n")
        if rec["rows"]:
            lines += sec.markdown(rec["rows"]) + [""]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=".data/cifar10.tgz", help="CIFAR-10 ImageFolder or its .tar.gz")
    p.add_argument("--out", help="results folder (default results/<timestamp>; an existing non-empty one is refused)")
    p.add_argument("--runs", default="runs/gpu_bench")
    p.add_argument("--coco", default=".data/coco128.tgz", help="coco128 folder or its .tgz (detection section)")
    p.add_argument("--detection-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the detection recipe, e.g. stages.0.epochs=100")
    p.add_argument("--sections", default=",".join(plan_order(list(sections()))),
                   help="comma-separated; run in priority order")
    p.add_argument("--cifar-variant", action="append", default=[],
                   help="extra CIFAR-10 run: space-separated overrides, e.g. 'model.name=convvit_tiny_32'")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="seconds for the whole call, counted from $GPU_BENCH_T0 (set by gpu_bench.sh) if given")
    p.add_argument("--mirror", help="also keep ledger.json and gpu_bench.md current in this folder (e.g. the "
                   "device tool's $OUT, which returns at most 8 files)")
    p.add_argument("--check-only", action="store_true", help="run the environment check and stop")
    p.add_argument("--toy", action="store_true", help="CPU, toy sizes: what the tests run")
    return p


def main(argv: list[str] | None = None) -> int:
    from .ledger import make_entry

    args = _parser().parse_args(argv)
    t0 = float(os.environ.get("GPU_BENCH_T0") or time.time())
    names = [n for n in args.sections.split(",") if n]
    secs = sections()
    unknown = [n for n in names if n not in secs]
    if unknown:
        print(f"gpu_bench: unknown section '{unknown[0]}' (known: {', '.join(secs)})", file=sys.stderr)
        return 2
    names = plan_order(names)
    facts, problems = check_environment(names, args)
    print("gpu_bench: " + ", ".join(f"{k} {v}" for k, v in facts.items()), flush=True)
    if problems:
        print(f"gpu_bench: environment check failed: {'; '.join(problems)}", file=sys.stderr)
        return 2
    if args.check_only:
        print(f"gpu_bench: environment ok for {', '.join(names)}")
        return 0
    args.stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"results/{args.stamp}")
    if out.exists() and any(out.iterdir()):
        print(f"gpu_bench: {out} exists and is not empty; choose another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    command = "scripts/gpu_bench.sh " + " ".join(argv if argv is not None else sys.argv[1:])
    entry = make_entry(command.strip(), source="gpu_bench")
    (out / "environment.json").write_text(json.dumps(entry["environment"], indent=2))
    records: dict[str, dict[str, Any]] = {}
    deadline = t0 + args.budget_s
    for i, name in enumerate(names):
        left = deadline - time.time()
        weights = sum(secs[n].share for n in names[i:])
        share = left * secs[name].share / weights
        if share < secs[name].min_s:
            records[name] = {"status": "skipped", "reason": f"{share:.0f} s of {left:.0f} s left would be its share, "
                             f"it needs at least {secs[name].min_s:.0f} s", "rows": []}
            print(f"== {name}: skipped ({records[name]['reason']})", flush=True)
        else:
            print(f"== {name} (share {share:.0f} s of {left:.0f} s left)", flush=True)
            records[name] = _run_section(name, args, share)
            print(f"== {name} took {records[name]['wall_s']:.0f} s", flush=True)
        (out / f"{name}.json").write_text(json.dumps(records[name], indent=2))
        entry["sections"] = records
        (out / "ledger.json").write_text(json.dumps(entry, indent=1))
        (out / "gpu_bench.md").write_text(markdown(records, entry))
        if args.mirror:
            Path(args.mirror).mkdir(parents=True, exist_ok=True)
            for f in ("ledger.json", "gpu_bench.md"):
                (Path(args.mirror) / f).write_text((out / f).read_text())
    print(markdown(records, entry))
    print(f"gpu_bench: {time.time() - t0:.0f} s of {args.budget_s:.0f} s; results in {out} "
          f"(add to the ledger: python -m effvision.benchmarks.ledger add {out / 'ledger.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
