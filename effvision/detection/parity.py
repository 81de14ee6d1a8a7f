"""Do two detectors return the same detections? Matched, not compared in order: detections whose
scores tie (to float precision) may come out in either order, or either one may be cut at the
per-image limit, in two runtimes that compute the same thing."""
from __future__ import annotations

from typing import Any

import torch
from torchvision.ops import box_iou

__all__ = ["match_detections", "agreement"]


def match_detections(reference: list[dict[str, torch.Tensor]], other: list[dict[str, torch.Tensor]],
                     tie: float = 1e-4, box_tol: float = 1e-3,
                     scales: list[tuple[float, float]] | None = None) -> dict[str, Any]:
    """Per image, each reference detection is matched to the other's detection of the same label
    with the closest box among those whose score is within ``tie`` of its own (the score
    tolerance: scores closer than it are ties whose order the runtimes may flip; a tied detection
    whose closest box is off by more than ``box_tol`` stays unmatched: a tie). ``scales``: per
    image, the factors (x, y) from the network's input frame to the image's pixels; box errors are divided
    by it, so they are measured where the network predicts them (a 640-pixel image seen at 128
    multiplies every difference by 5 on the way back). Returns the
    largest box error (pixels) and score error over matched pairs, the detections left unmatched
    on either side, and how many of those sit at a tie or at the score cut (allowed to differ)."""
    box_err = score_err = 0.0
    unmatched = excused = n_ref = n_other = 0
    for k, (ref, out) in enumerate(zip(reference, other, strict=True)):
        scale = torch.tensor(scales[k] * 2 if scales else (1.0,) * 4)  # (sx, sy, sx, sy)
        rb, rs, rl = ref["boxes"].float() / scale, ref["scores"].float(), ref["labels"]
        ob, os_, ol = out["boxes"].float() / scale, out["scores"].float(), out["labels"]
        n_ref, n_other = n_ref + len(rs), n_other + len(os_)
        free = torch.ones(len(os_), dtype=torch.bool)
        cut = float(min(rs.min(), os_.min())) if len(rs) and len(os_) else 0.0  # the lowest score kept
        for i in torch.argsort(rs, descending=True).tolist():
            near = free & (ol == rl[i]) & ((os_ - rs[i]).abs() <= tie)
            if not near.any():
                unmatched += 1
                excused += int(_tied(rs, i, tie) or float(rs[i]) - cut <= tie)
                continue
            err = (ob - rb[i]).abs().amax(dim=1).masked_fill(~near, float("inf"))
            j = int(err.argmin())
            if float(err[j]) > box_tol and _tied(rs, i, tie):
                unmatched, excused = unmatched + 1, excused + 1
                continue
            free[j] = False
            box_err, score_err = max(box_err, float(err[j])), max(score_err, float((os_[j] - rs[i]).abs()))
        extra = int(free.sum())  # the other's detections no reference one took
        unmatched += extra
        excused += sum(int(_tied(os_, j, tie) or float(os_[j]) - cut <= tie) for j in torch.nonzero(free).flatten().tolist())
    return {"images": len(reference), "detections": n_ref, "detections_other": n_other, "max_box_error": box_err,
            "max_score_error": score_err, "unmatched": unmatched, "unmatched_at_ties": excused}


def _tied(scores: torch.Tensor, i: int, tie: float) -> bool:
    """Another detection of the same image has (nearly) the same score."""
    return int(((scores - scores[i]).abs() <= tie).sum()) > 1


def agreement(reference: list[dict[str, torch.Tensor]], other: list[dict[str, torch.Tensor]],
              iou: float = 0.5) -> dict[str, Any]:
    """How far an approximation (INT8) keeps the reference's detections: the fraction of reference
    detections that the other has with the same label at IoU >= ``iou`` (greedy, best score
    first), and the score difference over those pairs."""
    found = total = 0
    diffs: list[float] = []
    for ref, out in zip(reference, other, strict=True):
        total += len(ref["scores"])
        if not len(ref["scores"]) or not len(out["scores"]):
            continue
        overlap = box_iou(ref["boxes"].float(), out["boxes"].float())          # (R, O)
        overlap[ref["labels"][:, None] != out["labels"][None, :]] = 0.0
        free = torch.ones(len(out["scores"]), dtype=torch.bool)
        for i in torch.argsort(ref["scores"], descending=True).tolist():
            row = overlap[i].masked_fill(~free, 0.0)
            j = int(row.argmax())
            if float(row[j]) >= iou:
                free[j] = False
                found += 1
                diffs.append(abs(float(out["scores"][j]) - float(ref["scores"][i])))
    return {"detections": total, "kept_at_iou": iou, "kept_fraction": found / total if total else 1.0,
            "mean_score_diff": sum(diffs) / len(diffs) if diffs else 0.0, "max_score_diff": max(diffs, default=0.0)}
