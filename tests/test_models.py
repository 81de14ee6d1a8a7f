"""effvision's models: registered in timm, full timm contract, save/load, the catalog CLI."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import timm
import torch

import effvision  # noqa: F401  (registers the models in timm)
from effvision.errors import EffVisionError
from effvision.models import ModelSpec, create_model, list_efficient_models, load_model, model_cost, save_model

MODELS = ["vit_micro_patch4_32", "vit_tiny_patch4_32", "vit_small_patch4_32", "convvit_tiny_32", "convvit_small_32"]
VIT_PATCH4 = ["vit_micro_patch4_32", "vit_tiny_patch4_32", "vit_small_patch4_32"]


def _x(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_models_are_registered_in_timm():
    registered = timm.list_models("*_32")
    for name in MODELS:
        assert timm.is_model(name) and name in registered
    assert set(list_efficient_models("*_32")) >= set(MODELS)
    cfg = timm.models.get_pretrained_cfg("vit_micro_patch4_32")
    assert tuple(cfg.input_size) == (3, 32, 32) and cfg.num_classes == 10


@pytest.mark.parametrize("name", MODELS)
def test_model_timm_contract(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    assert isinstance(model, timm.models.VisionTransformer)
    x = _x()
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 10) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
        feats = model.forward_features(x)
        assert feats.ndim == 3 and feats.shape[0] == 2 and feats.shape[2] == model.embed_dim
        assert torch.allclose(model.forward_head(feats), logits, atol=1e-6)
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        final, inter = model.forward_intermediates(x)
        assert len(inter) == len(model.blocks)
        for t in inter:
            assert t.shape == (2, model.embed_dim, 8, 8)  # 64 tokens on an 8x8 grid
        assert torch.allclose(final, feats, atol=1e-6)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(last2) == 2 and torch.allclose(last2[-1], inter[-1])
    # the samples differ: the model is not constant
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("name", MODELS)
def test_model_num_classes_and_reset_classifier(name):
    model = timm.create_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(_x()).shape == (2, 7)
        model.reset_classifier(3)
        assert model(_x()).shape == (2, 3)
        model.reset_classifier(0)
        assert model(_x()).shape == (2, model.num_features)
    one_channel = timm.create_model(name, in_chans=1).eval()
    with torch.no_grad():
        assert one_channel(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_models_refuse_pretrained_weights():
    with pytest.raises((ValueError, RuntimeError), match="no pretrained weights"):
        timm.create_model("vit_micro_patch4_32", pretrained=True)


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_matches_plain_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.0).train()
    x = _x(4)
    y = torch.arange(4) % 10

    def grads() -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        model.zero_grad(set_to_none=True)
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel()
            return t

        # count the activations autograd keeps for backward: checkpointing exists to cut them
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved[0]

    loss_plain, plain, saved_plain = grads()
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    loss_ckpt, ckpt, saved_ckpt = grads()
    model.set_grad_checkpointing(False)
    assert saved_ckpt < 0.5 * saved_plain, (saved_ckpt, saved_plain)
    assert torch.allclose(loss_plain, loss_ckpt, atol=1e-6)
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-5), n


def test_create_model_unknown_name_is_a_user_error():
    with pytest.raises(EffVisionError, match="unknown model 'vit_micro_patch4_3'"):
        create_model(ModelSpec(name="vit_micro_patch4_3"))
    with pytest.raises(EffVisionError, match="rejected its kwargs"):
        create_model(ModelSpec(name="vit_micro_patch4_32", kwargs={"no_such_arg": 1}))


def test_save_load_round_trip_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec(name="convvit_tiny_32", kwargs={"drop_path_rate": 0.1}, num_classes=5,
                     mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), class_names=list("abcde"))
    model = create_model(spec)
    # train a step so that weights (and BatchNorm statistics) differ from a fresh init
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    torch.nn.functional.cross_entropy(model(_x(8)), torch.arange(8) % 5).backward()
    opt.step()
    model.eval()
    model_dir = save_model(model, spec, tmp_path / "model")
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.json", "model.safetensors"]
    x = _x(3, seed=1)
    threads = torch.get_num_threads()
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(x)

    child = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads({threads})
        from effvision.models import load_model
        model, spec = load_model(sys.argv[1])
        assert (spec.name, spec.num_classes, spec.class_names) == ("convvit_tiny_32", 5, list("abcde")), spec
        assert tuple(spec.mean) == (0.1, 0.2, 0.3) and spec.kwargs == {{"drop_path_rate": 0.1}}, spec
        with torch.no_grad():
            out = model.eval()(torch.load(sys.argv[2]))
        torch.save(out, sys.argv[3])
    """)
    proc = subprocess.run([sys.executable, "-c", child, str(model_dir), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = torch.load(tmp_path / "y.pt")
    assert got.shape == (3, 5)
    assert torch.equal(got, expected)

    # and in this process, too: the loaded model carries the trained state, not a fresh init
    loaded, loaded_spec = load_model(model_dir)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), expected)
    assert loaded_spec == ModelSpec.from_json(spec.to_json())
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_load_model_errors(tmp_path):
    with pytest.raises(EffVisionError, match="no model in"):
        load_model(tmp_path)
    model_dir = save_model(timm.create_model("vit_micro_patch4_32"), ModelSpec(name="vit_micro_patch4_32"),
                           tmp_path / "m")
    (model_dir / "model.json").write_text("{not json")
    with pytest.raises(EffVisionError, match="corrupt model spec") as info:
        load_model(model_dir)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)  # chained: --debug and notebooks show it
    (model_dir / "model.json").write_text(ModelSpec(name="vit_micro_patch4_32").to_json())
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(EffVisionError, match="corrupt checkpoint") as info:
        load_model(model_dir)
    assert info.value.__cause__ is not None
    spec = json.loads(ModelSpec(name="vit_micro_patch4_32").to_json())
    (model_dir / "model.json").write_text(json.dumps({**spec, "modes": [{"mode": "no_such_mode", "version": 1}]}))
    with pytest.raises(EffVisionError, match="unknown model mode 'no_such_mode'"):
        load_model(model_dir)
    (model_dir / "model.json").write_text(json.dumps({**spec, "modes": [{"mode": "prune", "version": 9}]}))
    with pytest.raises(EffVisionError, match="prune version 9 is newer than this effvision reads"):
        load_model(model_dir)
    save_model(timm.create_model("vit_micro_patch4_32", num_classes=3), ModelSpec(name="vit_micro_patch4_32"),
               tmp_path / "m")  # spec says 10 classes, weights have 3
    with pytest.raises(EffVisionError, match="does not match the model"):
        load_model(model_dir)


def test_model_cost_matches_timm_params():
    for name in ("vit_micro_patch4_32", "convvit_tiny_32"):
        cost = model_cost(name)
        params = sum(p.numel() for p in timm.create_model(name).parameters())
        assert cost.params_m == pytest.approx(params / 1e6, rel=1e-9)
        assert cost.input_size == (3, 32, 32)
        assert cost.gmacs > 0
    micro, tiny = model_cost("vit_micro_patch4_32"), model_cost("vit_tiny_patch4_32")
    assert 0 < micro.gmacs < 0.1 and tiny.gmacs > micro.gmacs
    # a rough analytic count: blocks dominate, ~params-in-blocks MACs per token, 65 tokens
    assert micro.gmacs == pytest.approx(micro.params_m * 1e6 * 65 / 1e9, rel=0.3)


def test_models_cli_lists_vits_with_params_and_gmacs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "effvision", "models", "--filter", "patch4_32"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    header = lines[0]
    assert "params" in header and "GMACs" in header
    rows = {}
    for line in lines[1:]:
        m = re.match(r"^(\S+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)$", line)
        assert m, line
        rows[m.group(1)] = (float(m.group(2)), float(m.group(3)), m.group(4))
    assert sorted(rows) == sorted(VIT_PATCH4)
    for name, (params_m, gmacs, size) in rows.items():
        params = sum(p.numel() for p in timm.create_model(name).parameters())
        assert params_m == pytest.approx(params / 1e6, abs=0.006), name  # printed with 2 decimals
        assert gmacs > 0 and size == "3x32x32", name
    assert 0 < rows["vit_micro_patch4_32"][1] < 0.1
    assert rows["vit_micro_patch4_32"][0] < rows["vit_tiny_patch4_32"][0] < rows["vit_small_patch4_32"][0]


def test_models_cli_no_match_is_exit_2(tmp_path):
    from effvision.cli import main

    assert main(["models", "--filter", "zzz_no_such_family", "--no-cost"]) == 2
    assert main(["models", "--filter", "convvit", "--no-cost"]) == 0


def test_models_bench_measures_latency_and_writes_table_and_plot(tmp_path) -> None:
    """`effvision models --bench cpu`: measured torch and onnxruntime latency beside params/GMACs."""
    from effvision.speed import bench_models, pareto, write_speed_table

    rows = bench_models(["vit_micro_patch4_32"], "cpu", ("torch", "ort"), batch_size=1, warmup=1, iters=3,
                        progress=False)
    (row,) = rows
    assert row["torch_ms"] > 0 and row["ort_ms"] > 0 and row["params_m"] == pytest.approx(0.31, abs=0.01)
    # A slower, smaller model is dominated; a faster or larger one is on the front.
    rows.append({"model": "slow_small", "params_m": 0.1, "gmacs": 0.01, "torch_ms": row["torch_ms"] * 2})
    rows.append({"model": "fast_large", "params_m": 5.0, "gmacs": 1.0, "torch_ms": row["torch_ms"] / 2})
    assert pareto(rows, "torch") == ["fast_large"]
    paths = write_speed_table(rows, ("torch", "ort"), tmp_path / "speed", "test cpu")
    assert set(paths) == {"json", "md", "png"} and all(p.stat().st_size > 0 for p in paths.values())
    assert "| fast_large |" in paths["md"].read_text()
    with pytest.raises(EffVisionError, match="not empty"):
        write_speed_table(rows, ("torch",), tmp_path / "speed", "test cpu")


def test_macs_count_attention_on_the_cpu_as_on_meta() -> None:
    """One MAC count whatever the device: the CPU's fused SDPA kernel is counted too."""
    from effvision.models.catalog import count_params_macs, model_cost

    model = timm.create_model("vit_micro_patch4_32")
    _, cpu_gmacs = count_params_macs(model, (3, 32, 32))
    assert cpu_gmacs == pytest.approx(model_cost("vit_micro_patch4_32").gmacs)
    for block in model.blocks:  # the unfused path: explicit matmuls, counted by torch itself
        block.attn.fused_attn = False
    assert count_params_macs(model, (3, 32, 32))[1] == pytest.approx(cpu_gmacs)


def test_model_dir_loads_in_timm_itself(tmp_path) -> None:
    """A model dir is also a timm hub folder: timm.create_model('local-dir:DIR', pretrained=True)
    gives the same outputs and preprocessing as effvision's loader."""
    from effvision.models.io import ModelSpec, load_model, save_model

    for name, kwargs in [("vit_micro_patch4_32", {}), ("deit_tiny_patch16_224", {"img_size": 32, "depth": 1})]:
        spec = ModelSpec(name=name, kwargs=kwargs, num_classes=7, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2),
                         class_names=[f"c{i}" for i in range(7)])
        save_model(timm.create_model(name, num_classes=7, **kwargs), spec, tmp_path / name)
        ours, _ = load_model(tmp_path / name)
        theirs = timm.create_model(f"local-dir:{tmp_path / name}", pretrained=True)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(theirs.eval()(x), ours.eval()(x))
        data = timm.data.resolve_data_config(model=theirs)
        assert data["input_size"] == (3, 32, 32) and data["mean"] == pytest.approx((0.4, 0.4, 0.4))
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("vit_micro_patch4_32", pretrained=True)  # no weights source: a clear error
