"""Model dirs written before the mode record still load. tests/data/legacy_model_dirs holds the
model.json (and quant.json) that the previous effvision wrote (commit b104a45: ``pruned``,
``transforms``, quant.json), with the tensor shapes of the weights it saved beside them; the
reader migrates each to a record, the rebuilt model has exactly those tensors, and the dir then
saves (new format, no quant.json) and reloads to the same outputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import effvision as ev
from effvision.attention import SparseAttention
from effvision.compress.quantize import QuantLinear
from effvision.dynamic.contextual import ContextualBlock
from effvision.dynamic.reduce import ReduceBlock
from effvision.models.io import load_model, read_spec

LEGACY = Path(__file__).parent / "data" / "legacy_model_dirs"
EXPECT = {  # dir -> (record after migration, a module the record rebuilds)
    "pruned_quantized": (["prune", "quantize"], lambda m: isinstance(m.blocks[0].attn.qkv, QuantLinear)
                         and m.blocks[0].attn.num_heads == 1),  # 1 of 3 heads kept, as the old code pruned it
    "tome": (["reduce_tokens"], lambda m: isinstance(m.blocks[0], ReduceBlock) and m.blocks[0].tome_r == 4),
    "evit": (["reduce_tokens"], lambda m: isinstance(m.blocks[1], ReduceBlock) and m.blocks[1].evit_keep > 0),
    "sparse": (["sparse_attention"], lambda m: isinstance(m.blocks[0].attn, SparseAttention)),
    "contextual": (["contextual_sparsity"], lambda m: isinstance(m.blocks[0], ContextualBlock)),
    "early_exit": (["early_exit"], lambda m: len(m.exit_heads) == 1 and m.exit_policy == ("confidence", 0.8)),
}


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_a_model_dir_from_before_the_record_loads_and_saves_anew(name: str, tmp_path: Path) -> None:
    d = tmp_path / name
    shutil.copytree(LEGACY / name, d)
    shapes = json.loads((d / "shapes.json").read_text())
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=g).abs() + 0.1 for k, s in shapes.items()}, str(d / "model.safetensors"))
    assert "modes" not in json.loads((d / "model.json").read_text())  # the old format, as written

    modes, rebuilt = EXPECT[name]
    assert [m["mode"] for m in read_spec(d).modes] == modes
    model, _ = load_model(d)  # strict: every tensor the old code saved, no other
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == shapes
    assert rebuilt(model)
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        before = model.eval()(x)
    ev.save(model, tmp_path / "again")
    assert not (tmp_path / "again" / "quant.json").exists()
    assert [m["mode"] for m in json.loads((tmp_path / "again" / "model.json").read_text())["modes"]] == modes
    with torch.no_grad():
        torch.testing.assert_close(ev.load(tmp_path / "again").eval()(x), before, rtol=0, atol=0)
