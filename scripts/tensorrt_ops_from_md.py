"""Regenerate export/data/tensorrt_ops.json (the offline TensorRT op list behind
effvision.export.check_tensorrt) from onnx-tensorrt's docs/operators.md.

    python scripts/tensorrt_ops_from_md.py operators.md "onnx/onnx-tensorrt docs/operators.md at ..." \
        > export/data/tensorrt_ops.json

The header line gives the TensorRT version and opset range; each table row an op, Y/N, its
types and restrictions.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def parse(text: str, source: str) -> dict:
    header = re.search(r"TensorRT\s+([0-9.]+)\s+supports operators in the inclusive range of opset\s+(\d+)\s+"
                       r"to opset\s+(\d+)", text)
    if header is None:
        raise SystemExit("no 'TensorRT X supports operators in the inclusive range of opset A to opset B' line")
    ops = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[1] not in ("Y", "N"):
            continue
        ops[cells[0]] = {"supported": cells[1] == "Y", "types": cells[2] if len(cells) > 2 else "",
                         "restrictions": cells[3] if len(cells) > 3 else ""}
    return {"source": source, "tensorrt": header.group(1), "opset_min": int(header.group(2)),
            "opset_max": int(header.group(3)), "ops": dict(sorted(ops.items()))}


if __name__ == "__main__":
    print(json.dumps(parse(Path(sys.argv[1]).read_text(), sys.argv[2]), indent=1))
