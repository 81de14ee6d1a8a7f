"""Composition by design: every ordered pair of modes on a small ViT either works (A then B,
save, load in a fresh process with identical outputs, ONNX export with parity) or is refused by
the mode rules before any work, and a recipe that asks for it is refused by preflight with the
rule, before a run directory exists. The matrix this test checks is the one docs/composition.md prints
(``python tests/test_composition.py`` prints it)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import effvision as ev
from effvision.assemble.grow import GrowConfig, grow_model
from effvision.attention import SparseAttentionConfig
from effvision.compress import PruneSpec
from effvision.compress.quantize import QuantConfig
from effvision.dynamic import ContextualConfig, ExitConfig, TokenReduceConfig
from effvision.export import OnnxExportConfig, export_model_dir
from effvision.models.io import ModelSpec, create_model, save_model, spec_of_model
from effvision.models.modes import ModeRuleError, check_next, get_mode, record_of
from effvision.recipe import parse_recipe
from effvision.stages import preflight

from conftest import cli, tiny_recipe

SPEC = ModelSpec(name="vit_micro_patch4_32", num_classes=10, kwargs={"depth": 2})  # 2 blocks, width 96, 3 heads
CALIB = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))


def _grow(m: nn.Module) -> nn.Module:
    return grow_model(m, spec_of_model(m), GrowConfig(depth=3))[0]  # a new model: growth has no in-place convert


# name -> (the mode, its config: applied with the mode's registered convert; the recipe stage that applies it)
MODES: dict[str, tuple[str, object, dict]] = {
    "prune": ("prune", PruneSpec(ratios={"heads": 0.34, "mlp": 0.5}), {"type": "prune", "heads": 0.34, "mlp": 0.5}),
    "quantize ort-cpu": ("quantize", QuantConfig(target="ort-cpu", calib_batches=2, min_calib_samples=8),
                         {"type": "quantize", "target": "ort-cpu"}),
    "quantize tensorrt": ("quantize", QuantConfig(target="tensorrt", calib_batches=2, min_calib_samples=8),
                          {"type": "quantize", "target": "tensorrt"}),
    "reduce_tokens tome": ("reduce_tokens", TokenReduceConfig(method="tome", r=4),
                           {"type": "reduce_tokens", "method": "tome", "r": 4}),
    "reduce_tokens evit": ("reduce_tokens", TokenReduceConfig(method="evit", keep_rate=0.7),
                           {"type": "reduce_tokens", "method": "evit", "keep_rate": 0.7}),
    "sparse_attention": ("sparse_attention", SparseAttentionConfig(recovery=0.9, block=16),
                         {"type": "sparse_attention", "recovery": 0.9, "block": 16}),
    "contextual": ("contextual_sparsity", ContextualConfig(head_keep=0.67, mlp_keep=0.5, rank=8, steps=20),
                   {"type": "contextual_sparsity", "head_keep": 0.67, "mlp_keep": 0.5, "rank": 8, "steps": 20}),
    "early_exit": ("early_exit", ExitConfig(after=[0], threshold=0.9), {"type": "early_exit", "epochs": 1,
                                                                         "exits": {"after": [0]}}),
    "grow": ("grow", GrowConfig(depth=3), {"type": "grow", "depth": 3}),
}
MODE_OF = {name: mode for name, (mode, _, _) in MODES.items()}
PAIRS = [(a, b) for a in MODES for b in MODES]


def _apply(model: nn.Module, name: str) -> nn.Module:
    mode, cfg, _ = MODES[name]
    if mode == "grow":
        return _grow(model).eval()
    get_mode(mode).convert(model, copy.deepcopy(cfg), CALIB)  # the mode's verb, from the registry
    return model.eval()


def _recipe(a: str, b: str) -> object:
    return parse_recipe({"name": "pair", "device": "cpu", "model": {"name": SPEC.name, "kwargs": dict(SPEC.kwargs)},
                         "data": {"name": "digits"}, "stages": [MODES[a][2], MODES[b][2]]})


def compose_all(out: Path) -> dict[tuple[str, str], str]:
    """Every pair applied (and saved under ``out``) or refused: {(a, b): "ok" | "refused: <rule>"}."""
    verdicts: dict[tuple[str, str], str] = {}
    for a, b in PAIRS:
        torch.manual_seed(0)
        model = _apply(create_model(SPEC), a)
        try:
            check_next(record_of(model), MODE_OF[b])
        except ModeRuleError as e:
            verdicts[(a, b)] = f"refused: {e}"
            continue
        model = _apply(model, b)
        assert [m["mode"] for m in record_of(model)] == [MODE_OF[a], MODE_OF[b]]
        d = out / f"{a}__{b}".replace(" ", "_")
        save_model(model, spec_of_model(model), d)  # the spec the model carries (grow changes its kwargs)
        with torch.no_grad():
            torch.save(model(X), d / "eager.pt")
        verdicts[(a, b)] = "ok"
    return verdicts


_FRESH = """
import sys, tempfile, torch
from pathlib import Path
import effvision as ev
x = torch.load(sys.argv[2], weights_only=True)
for d in sorted(Path(sys.argv[1]).iterdir()):
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        torch.save(ev.load(d).eval()(x), d / "fresh.pt")
        ev.save(ev.load(d), Path(tmp) / "again")  # load -> save -> load
        torch.save(ev.load(Path(tmp) / "again").eval()(x), d / "again.pt")
"""


@pytest.fixture(scope="module")
def composed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[tuple[str, str], str]]:
    out = tmp_path_factory.mktemp("pairs")
    return out, compose_all(out)


def test_every_pair_works_or_is_refused_by_its_rule(composed) -> None:
    out, verdicts = composed
    refused = {p for p, v in verdicts.items() if v != "ok"}
    # the rules that make a pair impossible, stated once per mode (models/modes.py registrations)
    assert {("quantize ort-cpu", b) for b in MODES} <= refused and {("contextual", b) for b in MODES} <= refused
    assert {(a, "grow") for a in MODES if a != "grow"} <= refused  # grow comes first
    assert {(a, "prune") for a in ("reduce_tokens tome", "sparse_attention", "early_exit")} <= refused
    works = {p for p, v in verdicts.items() if v == "ok"}
    assert {("prune", b) for b in MODES if b != "grow"} <= works and {("grow", b) for b in MODES} <= works
    assert {("reduce_tokens evit", "quantize tensorrt"), ("sparse_attention", "early_exit"),
            ("early_exit", "sparse_attention"), ("sparse_attention", "quantize ort-cpu")} <= works
    for p in refused:
        assert "cannot follow" in verdicts[p] and len(verdicts[p].splitlines()) == 1


def test_working_pairs_reload_identically_in_a_fresh_process(composed, tmp_path: Path) -> None:
    out, verdicts = composed
    torch.save(X, tmp_path / "x.pt")
    r = subprocess.run([sys.executable, "-c", _FRESH, str(out), str(tmp_path / "x.pt")], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for d in sorted(out.iterdir()):
        eager = torch.load(d / "eager.pt", weights_only=True)
        for name in ("fresh.pt", "again.pt"):
            torch.testing.assert_close(torch.load(d / name, weights_only=True), eager, rtol=0, atol=0,
                                       msg=lambda m, d=d, name=name: f"{d.name} {name}: {m}")
    assert len(list(out.iterdir())) == sum(v == "ok" for v in verdicts.values())


def test_working_pairs_export_to_onnx_with_parity(composed, tmp_path: Path) -> None:
    out, _ = composed
    for d in sorted(out.iterdir()):
        # export_model_dir checks onnxruntime against the PyTorch model (fp32: atol 1e-4; QDQ: the
        # quantized target's own check) and raises on a mismatch
        result = export_model_dir(d, tmp_path / d.name, OnnxExportConfig(parity_batch_sizes=[2]))
        assert result["parity"], d.name


def test_refused_pairs_are_refused_by_preflight(composed) -> None:
    _, verdicts = composed
    for (a, b), v in verdicts.items():
        if v == "ok":
            continue
        with pytest.raises(ModeRuleError, match=r"stages\[1\] \(\w+\): \w+ cannot follow \w+"):
            preflight(_recipe(a, b))


def test_stages_compose_prune_quantize_then_qat_finetune(tmp_path: Path) -> None:
    """The reported failure: a later stage (finetune) loads the quantized model dir and saves it
    again; that dir then loads (and exports) like any other, and load -> save -> load holds."""
    recipe = tiny_recipe(tmp_path / "r.yaml", model={"kwargs": {"depth": 2}}, data={"limit_train": 128, "limit_eval": 64},
                         stages=[{"type": "train", "epochs": 1, "optimizer": {"name": "adamw", "lr": 2.0e-3}},
                                 MODES["prune"][2], {**MODES["quantize ort-cpu"][2], "calib_batches": 1, "val_batches": 1},
                                 {"type": "finetune", "epochs": 1, "amp": "off", "optimizer": {"name": "adamw", "lr": 1e-4}},
                                 {"type": "export"}])
    run = tmp_path / "run"
    r = cli("run", str(recipe), "--out", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    spec = json.loads((run / "04-finetune" / "model" / "model.json").read_text())
    assert [m["mode"] for m in spec["modes"]] == ["prune", "quantize"]
    manifest = json.loads((run / "05-export" / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["target"] == "ort-cpu"
    model = ev.load(run / "04-finetune" / "model")
    ev.save(model, tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(ev.load(tmp_path / "again").eval()(X), model.eval()(X), rtol=0, atol=0)


def test_cli_refuses_an_impossible_order_before_any_run_directory(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "r.yaml", stages=[MODES["quantize tensorrt"][2], MODES["reduce_tokens tome"][2],
                                                      {"type": "export"}])
    r = cli("run", str(recipe), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and not (tmp_path / "run").exists()
    assert r.stderr.strip() == ("effvision: error: stages[1] (reduce_tokens): reduce_tokens cannot follow quantize: "
                                "quantize comes last (its calibrated ranges hold for the layers as they are); apply the "
                                "other change before quantize, or fine-tune the quantized model (QAT) with a finetune "
                                "stage")


def test_composition_page_prints_this_matrix(composed) -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "composition.md").read_text()
    block = text.split("<!-- composition-matrix -->\n", 1)[1].split("<!-- /composition-matrix -->", 1)[0]
    assert block.strip() == matrix_markdown(composed[1]), "update docs/composition.md's matrix: python tests/test_composition.py"


def matrix_markdown(verdicts: dict[tuple[str, str], str]) -> str:
    """docs/composition.md's table: rows A (first), columns B (then)."""
    names = list(MODES)
    lines = ["| A, then B | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for a in names:
        cells = ["works" if verdicts[(a, b)] == "ok" else "refused" for b in names]
        lines.append(f"| **{a}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # print docs/composition.md's matrix
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(matrix_markdown(compose_all(Path(tmp))))
