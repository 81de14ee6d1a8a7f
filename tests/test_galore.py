"""GaLore optimizers: equivalence with galore-torch 1.0, projector properties, per-layer
updates, 8-bit states, bad input. CPU, small timm ViTs, seconds."""
from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

import effvision  # noqa: F401
import effvision.stages  # noqa: F401  (registers the galore_* optimizers)
from effvision.config import parse
from effvision.engine import OptimizerConfig, TrainConfig, Trainer
from effvision.engine.distributed import DistInfo
from effvision.errors import ConfigError, EffVisionError, TrainingDiverged
from effvision.optim import (GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, build_galore, galore_param_groups,
                             optimizer_state_bytes, split_params)

from galore_reference import load_reference_adafactor, load_reference_adamw

torch.set_num_threads(1)  # 2 threads on this shared 2-core machine made a 288x96 SVD 100x slower (OpenMP contention)


def _vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_micro_patch4_32", num_classes=10)  # width 96: qkv 288x96, fc2 96x192


def _batches(n: int, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def _groups(model: nn.Module, rank: int, gap: int, scale: float, proj_type: str) -> list[dict]:
    split = split_params(model)
    return [{"params": [p for _, p in split.decay + split.no_decay]},
            {"params": [p for _, p in split.galore], "rank": rank, "update_proj_gap": gap, "scale": scale,
             "proj_type": proj_type}]


def _step_with_same_grads(ours: torch.optim.Optimizer, ours_m: nn.Module, ref: torch.optim.Optimizer,
                          ref_m: nn.Module, steps: int, label: str) -> None:
    """Step both optimizers with our model's gradients; after every step each parameter agrees
    with the reference's within 1e-5 of its largest entry."""
    for x, y in _batches(steps):
        _loss(ours_m, x, y).backward()
        for a, b in zip(ours_m.parameters(), ref_m.parameters()):
            b.grad = a.grad.clone()
        ours.step()
        ref.step()
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        with torch.no_grad():
            for (name, a), b in zip(ours_m.named_parameters(), ref_m.parameters()):
                err = float((a - b).abs().max() / b.abs().max())
                assert err < 1e-5, f"{label}: {name} differs by {err:.2e} (relative to its max)"


# ---- against the reference --------------------------------------------------------------------
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_matches_galore_torch_reference(proj_type: str) -> None:
    """Same seeds, same gradients: parameters agree with galore-torch 1.0 to fp32 tolerance over
    4*T steps, projector refreshes at 0, T, 2T, 3T included. The gradients come from our model's
    training trajectory and are copied to the reference's parameters: singular vectors are not
    continuous in the matrix (sign and order flip between near-equal singular values), so two
    trajectories 1e-8 apart may legitimately pick different bases at a refresh."""
    RefAdamW = load_reference_adamw()
    if RefAdamW is None:
        pytest.skip("galore-torch is not installed (scripts/setup.sh installs it)")
    T, steps = 3, 12
    ours_m, ref_m = _vit(), _vit()
    kw = dict(lr=1e-3, weight_decay=0.05, eps=1e-6)
    ours = GaLoreAdamW(_groups(ours_m, 16, T, 0.25, proj_type), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = RefAdamW(_groups(ref_m, 16, T, 0.25, proj_type), no_deprecation_warning=True, **kw)
    _step_with_same_grads(ours, ours_m, ref, ref_m, steps, proj_type)
    # the projected moments have the reference's shapes
    for p, q in zip(ours.param_groups[1]["params"], ref.param_groups[1]["params"]):
        assert ours.state[p]["exp_avg"].shape == ref.state[q]["exp_avg"].shape


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_adafactor_matches_galore_torch_reference(beta1: float | None) -> None:
    """GaLoreAdafactor vs galore-torch 1.0's Adafactor with a fixed lr (no relative step, no
    parameter scaling), weight decay 0 (the reference decays before the update, we after, as
    in AdamW: they differ by O(lr^2 * wd)); same gradients, 4*T steps."""
    RefAdafactor = load_reference_adafactor()
    if RefAdafactor is None:
        pytest.skip("galore-torch is not installed (scripts/setup.sh installs it)")
    T, steps = 3, 12
    ours_m, ref_m = _vit(), _vit()
    ours = GaLoreAdafactor(_groups(ours_m, 16, T, 0.25, "std"), lr=1e-3, beta1=beta1)
    ref = RefAdafactor(_groups(ref_m, 16, T, 0.25, "std"), lr=1e-3, beta1=beta1, scale_parameter=False,
                       relative_step=False, warmup_init=False)
    _step_with_same_grads(ours, ours_m, ref, ref_m, steps, f"beta1={beta1}")


# ---- properties --------------------------------------------------------------------------------
def _step_matrix(shape: tuple[int, int], rank: int, gap: int, steps: int, proj_type: str = "std", **kw):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(*shape))
    opt = GaLoreAdamW([{"params": [w], "rank": rank, "update_proj_gap": gap, "proj_type": proj_type, **kw}], lr=1e-2)
    projs = []
    for _ in range(steps):
        w.grad = torch.randn(*shape)
        opt.step()
        projs.append(opt.state[w]["proj"])
    return w, opt, projs


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (30, 30)])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_projector_orthonormal_and_state_shapes(shape: tuple[int, int], proj_type: str) -> None:
    m, n = shape
    r = 8
    w, opt, _ = _step_matrix(shape, r, 5, 2, proj_type)
    st = opt.state[w]
    eye = torch.eye(r)
    side = {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right"}.get(proj_type, proj_type)
    p = st["proj"]
    gram = p @ p.T if side == "right" else p.T @ p
    torch.testing.assert_close(gram, eye, atol=1e-5, rtol=0)
    if side == "full":
        q = st["proj_right"]
        torch.testing.assert_close(q @ q.T, eye, atol=1e-5, rtol=0)
    expect = {"right": (m, r), "left": (r, n), "full": (r, r)}[side]
    assert st["exp_avg"].shape == st["exp_avg_sq"].shape == expect
    if proj_type == "std":  # the smaller state: 2 * max(m, n) * r numbers instead of 2 * m * n
        assert st["exp_avg"].numel() + st["exp_avg_sq"].numel() == 2 * max(m, n) * r


def test_svd_cadence() -> None:
    """The projector is recomputed at steps 0, T, 2T, ... and kept in between."""
    T, steps = 4, 11
    w, opt, projs = _step_matrix((32, 16), 4, T, steps)
    assert opt.state[w]["refreshes"] == 3  # steps 0, 4, 8
    for i in range(1, steps):
        assert (projs[i] is not projs[i - 1]) == (i % T == 0), f"step {i}"


def test_conv_weight_is_projected_as_a_matrix() -> None:
    """An (O, I, k, k) conv weight follows exactly the (O, I*k*k) matrix with the same gradients."""
    torch.manual_seed(0)
    conv = nn.Parameter(torch.randn(16, 4, 3, 3))
    mat = nn.Parameter(conv.detach().reshape(16, 36).clone())
    opts = [GaLoreAdamW([{"params": [p], "rank": 6, "update_proj_gap": 3}], lr=1e-2, weight_decay=0.1)
            for p in (conv, mat)]
    for _ in range(7):
        g = torch.randn(16, 4, 3, 3)
        conv.grad, mat.grad = g.clone(), g.reshape(16, 36).clone()
        for o in opts:
            o.step()
    torch.testing.assert_close(conv.detach().reshape(16, 36), mat.detach(), atol=1e-6, rtol=1e-6)


def test_randomized_svd_finds_the_dominant_subspace() -> None:
    torch.manual_seed(0)
    g = torch.randn(200, 8) @ torch.randn(8, 120) + 1e-3 * torch.randn(200, 120)  # rank 8 + noise
    w = nn.Parameter(torch.zeros(200, 120))
    opt = GaLoreAdamW([{"params": [w], "rank": 8, "svd": "randomized"}], lr=1e-3)
    w.grad = g
    opt.step()
    p = opt.state[w]["proj"]                        # (8, 120): right projector
    torch.testing.assert_close(p @ p.T, torch.eye(8), atol=1e-4, rtol=0)
    vh = torch.linalg.svd(g, full_matrices=False)[2][:8]
    # same subspace: the projection of the exact basis onto ours keeps its norm
    assert torch.linalg.matrix_norm(vh @ p.T) ** 2 > 8 - 1e-3
    # the sketch ignores the global RNG (DDP ranks with different RNG states agree)
    torch.manual_seed(123)
    w2 = nn.Parameter(torch.zeros(200, 120))
    opt2 = GaLoreAdamW([{"params": [w2], "rank": 8, "svd": "randomized"}], lr=1e-3)
    w2.grad = g
    opt2.step()
    assert torch.equal(opt2.state[w2]["proj"], p)


def test_svd_failure_keeps_previous_projector() -> None:
    w = nn.Parameter(torch.randn(20, 10))
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 1}], lr=1e-3)
    w.grad = torch.randn(20, 10)
    opt.step()
    before = opt.state[w]["proj"].clone()
    w.grad = torch.full((20, 10), float("nan"))
    with pytest.warns(RuntimeWarning, match="keeping the previous projector"):
        opt.step()
    assert opt.state[w]["svd_failures"] == 1
    assert torch.equal(opt.state[w]["proj"], before)
    fresh = nn.Parameter(torch.randn(20, 10))
    opt2 = GaLoreAdamW([{"params": [fresh], "rank": 4}], lr=1e-3)
    fresh.grad = torch.full((20, 10), float("inf"))
    with pytest.raises(TrainingDiverged, match="before any projector existed"):
        opt2.step()


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor])
def test_layerwise_equals_global_step(cls: type) -> None:
    """Per-layer updates in backward give bit-identical weights to one global step, and no
    gradient is left after backward."""
    a, b = _vit(), _vit()
    cfg = OptimizerConfig(name="galore_adamw", lr=1e-3, rank=16, update_proj_gap=2)
    opts = [cls(galore_param_groups(m, cfg), lr=1e-3, weight_decay=0.05, layerwise=lw)
            for m, lw in ((a, False), (b, True))]
    for x, y in _batches(5):
        _loss(a, x, y).backward()
        opts[0].step()
        opts[0].zero_grad(set_to_none=True)
        _loss(b, x, y).backward()
        assert all(p.grad is None for p in b.parameters())
        opts[1].step()  # finds nothing left to do
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_state_dict_roundtrip_resumes_identically() -> None:
    """A checkpointed GaLore state (plain tensors, weights_only load) continues exactly."""
    a = _vit()
    cfg = OptimizerConfig(name="galore_adamw8bit", lr=1e-3, rank=8, update_proj_gap=2)
    opt = build_galore(a, cfg)
    data = _batches(6)
    for x, y in data[:3]:
        _loss(a, x, y).backward()
        opt.step()
        opt.zero_grad()
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b = _vit(seed=5)
    b.load_state_dict(saved["model"])
    opt_b = build_galore(b, cfg)
    opt_b.load_state_dict(saved["opt"])
    for x, y in data[3:]:
        for m, o in ((a, opt), (b, opt_b)):
            _loss(m, x, y).backward()
            o.step()
            o.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_8bit_tracks_fp32_and_saves_memory() -> None:
    a, b = _vit(), _vit()
    cfg = OptimizerConfig(name="galore_adamw", lr=1e-3, rank=16)
    o32 = build_galore(a, cfg)
    o8 = build_galore(b, OptimizerConfig(name="galore_adamw8bit", lr=1e-3, rank=16, kwargs={"min_8bit_size": 0}))
    start = {n: p.detach().clone() for n, p in a.named_parameters()}
    for x, y in _batches(10):
        for m, o in ((a, o32), (b, o8)):
            _loss(m, x, y).backward()
            o.step()
            o.zero_grad()
    # the 8-bit run's total weight change stays close to the fp32 run's
    num = sum(float((p - q).norm() ** 2) for p, q in zip(a.parameters(), b.parameters())) ** 0.5
    den = sum(float((p - start[n]).norm() ** 2) for n, p in a.named_parameters()) ** 0.5
    assert num / den < 0.1, f"8-bit drifted {num / den:.3f} of the fp32 update"
    m32, m8 = optimizer_state_bytes(o32)["moments"], optimizer_state_bytes(o8)["moments"]
    assert m8 < 0.3 * m32, (m8, m32)  # 1 byte + 4/256 per element instead of 4


def test_adafactor_state_is_factored_and_loss_falls() -> None:
    model = _vit()
    opt = build_galore(model, OptimizerConfig(name="galore_adafactor", lr=3e-3, rank=16, kwargs={"beta1": 0.9}))
    x, y = _batches(1, batch=32)[0]
    losses = []
    for _ in range(15):
        loss = _loss(model, x, y)
        losses.append(float(loss))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.7 * losses[0], losses
    qkv = model.blocks[0].attn.qkv.weight           # (288, 96) -> projected (288, 16)
    st = opt.state[qkv]
    assert st["row"].shape == (288,) and st["col"].shape == (16,)


def test_state_memory_vs_adamw() -> None:
    """Optimizer state of GaLore (moments + projectors) against torch AdamW on the same model."""
    model = _vit()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    galore = build_galore(copy.deepcopy(model), OptimizerConfig(name="galore_adamw", lr=1e-3, rank=8))
    for o in (adamw, galore):
        params = [p for g in o.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.randn_like(p)
        o.step()
    full = sum(v.numel() * v.element_size() for s in adamw.state.values() for k, v in s.items() if k != "step")
    ours = optimizer_state_bytes(galore)
    assert ours["moments"] + ours["projectors"] < 0.5 * full


# ---- bad input ---------------------------------------------------------------------------------
def _opt_cfg(**kw) -> OptimizerConfig:
    return parse(OptimizerConfig, {"name": "galore_adamw", "rank": 8, **kw}, "stages[0].optimizer")


def test_bad_config_is_refused_at_parse() -> None:
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        _opt_cfg(rank=0)
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        parse(OptimizerConfig, {"name": "galore_adamw"}, "opt")
    with pytest.raises(ConfigError, match="applies to the galore_\\* optimizers only"):
        parse(OptimizerConfig, {"name": "adamw", "rank": 8}, "opt")
    with pytest.raises(ConfigError, match="update_proj_gap must be positive"):
        _opt_cfg(update_proj_gap=0)
    with pytest.raises(ConfigError, match="grad_clip cannot be combined"):
        parse(TrainConfig, {"optimizer": {"name": "galore_adamw", "rank": 8, "layerwise": True}, "grad_clip": 1.0}, "t")
    with pytest.raises(ConfigError, match="amp fp16"):
        parse(TrainConfig, {"optimizer": {"name": "galore_adamw", "rank": 8, "layerwise": True}, "amp": "fp16"}, "t")


def test_bad_targets_and_rank_are_refused_at_build() -> None:
    model = _vit()
    with pytest.raises(ConfigError, match="rank 97 exceeds min\\(m, n\\) = 96"):
        build_galore(model, _opt_cfg(rank=97))
    with pytest.raises(ConfigError, match="match no trainable parameter"):
        build_galore(model, _opt_cfg(targets=[r"attn\.qkv\.weight$", r"nonexistent\.weight$"]))
    with pytest.raises(ConfigError, match="only matrices"):
        build_galore(model, _opt_cfg(targets=[r"attn\.qkv\.bias$"]))
    with pytest.raises(ConfigError, match="optimizer.kwargs"):
        build_galore(model, _opt_cfg(kwargs={"momentum_typo": 1}))
    # patch embedding, norms, tokens and head are never in the default targets
    names = [n for n, _ in split_params(model).galore]
    assert len(names) == 4 * 4 and not any(k in n for n in names for k in ("patch_embed", "norm", "head", "token"))


def test_layerwise_refused_under_ddp(tmp_path: Path) -> None:
    from effvision.data import AugmentConfig, DataConfig, build_loaders
    loaders = build_loaders(DataConfig(name="digits", batch_size=32, limit_train=64, limit_eval=32,
                                       augment=AugmentConfig(crop_padding=0, hflip=False)),
                            device=torch.device("cpu"), seed=0, mean=(0.5,) * 3, std=(0.5,) * 3)
    cfg = TrainConfig(epochs=1, optimizer=_opt_cfg(layerwise=True))
    with pytest.raises(EffVisionError, match="before DDP has averaged it"):
        Trainer(_vit(), cfg, loaders, device=torch.device("cpu"), out_dir=tmp_path, num_classes=10,
                dist=DistInfo(rank=0, world_size=2), progress=False)


def test_bench_helper_and_gpu_section_table_on_cpu() -> None:
    """The code gpu_bench's galore section runs, on the CPU with a small model: rows and table."""
    from effvision.optim.bench import bench_optimizer
    from effvision.optim.gpu_section import galore_markdown
    rows = []
    for variant, cfg in (("AdamW (torch)", OptimizerConfig(name="adamw", lr=1e-3)),
                         ("galore_adamw layerwise", OptimizerConfig(name="galore_adamw", lr=1e-3, rank=8,
                                                                    layerwise=True))):
        r = bench_optimizer("vit_micro_patch4_32", cfg, batch=2, steps=2, warmup=1, device=torch.device("cpu"),
                            amp="off", img_size=32)
        rows.append({**r, "part": "step", "variant": variant})
    assert rows[1]["layerwise"] and 0 < rows[1]["state_mb"] < 0.5 * rows[0]["state_mb"]
    table = "\n".join(galore_markdown(rows))
    assert "| 2 | galore_adamw layerwise |" in table and "n/a" in table


def test_layerwise_never_holds_all_gradients() -> None:
    """Where the peak-memory gain comes from: during a per-layer backward, at most one
    parameter's gradient is alive at any moment; a global step ends backward holding all."""
    alive = {}
    for layerwise in (True, False):
        model = _vit()
        build_galore(model, OptimizerConfig(name="galore_adamw", lr=1e-3, rank=8, layerwise=layerwise))
        params = list(model.parameters())
        counts: list[int] = []
        for p in params:  # registered after the optimizer's hooks, so it runs after them
            p.register_post_accumulate_grad_hook(lambda _: counts.append(sum(q.grad is not None for q in params)))
        x, y = _batches(1)[0]
        _loss(model, x, y).backward()
        alive[layerwise] = max(counts)
        assert len(counts) == len(params)
    assert alive[True] == 0 and alive[False] == len(list(_vit().parameters()))
