"""Token merging (ToMe) and token pruning (EViT): exactness at r=0, persistence in the model
spec, ONNX export with onnxruntime parity and the TensorRT op check, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import timm
import torch

import effvision.models.small_vit  # noqa: F401
from effvision.dynamic import TokenReduceConfig, reduce_tokens_
from effvision.errors import ConfigError, EffVisionError
from effvision.export import OnnxExportConfig, export_model_dir
from effvision.export.tensorrt_check import check_tensorrt
from effvision.models.io import ModelSpec, create_model, load_model, save_model


def _vit(name="vit_micro_patch4_32", **kw):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kw).eval()


def test_tome_r0_is_exact_and_merging_shrinks_tokens():
    m, x = _vit(), torch.randn(2, 3, 32, 32)
    dense = m(x)
    reduce_tokens_(m, TokenReduceConfig(r=0))
    assert torch.equal(m(x), dense)
    m2 = _vit()
    counts = reduce_tokens_(m2, TokenReduceConfig(r=8))
    assert counts == [65, 57, 49, 41, 33]
    assert m2.state_dict().keys() == m.state_dict().keys()  # class swap, not wrapping


@pytest.mark.parametrize("kw", [dict(name="deit_tiny_distilled_patch16_224", img_size=64, depth=2),
                                dict(name="vit_tiny_patch16_224", img_size=64, depth=2, reg_tokens=2)])
def test_prefix_tokens_survive(kw):
    """Distilled and register-token ViTs: prefix tokens are never merged or pruned."""
    for cfg in (TokenReduceConfig(r=3), TokenReduceConfig(method="evit", keep_rate=0.5)):
        m = _vit(**kw)
        counts = reduce_tokens_(m, cfg)
        assert counts[-1] < counts[0]
        out = m(torch.randn(2, 3, 64, 64))
        assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_size_weighted_avg_pool_and_evit_refusal():
    m, x = _vit("convvit_tiny_32", depth=2), torch.randn(1, 3, 32, 32)
    reduce_tokens_(m, TokenReduceConfig(r=16))
    assert m(x).shape == (1, 10)
    with pytest.raises(EffVisionError, match="EViT needs a CLS token"):
        reduce_tokens_(_vit("convvit_tiny_32", depth=2), TokenReduceConfig(method="evit"))


def test_bad_input_one_line_before_any_change():
    m = _vit()
    with pytest.raises(ConfigError, match="at most"):
        reduce_tokens_(m, TokenReduceConfig(r=40))
    assert type(m.blocks[0]).__name__ == "Block"  # untouched
    with pytest.raises(ConfigError, match="keep_rate"):
        reduce_tokens_(m, TokenReduceConfig(method="evit", keep_rate=0.0))
    with pytest.raises(ConfigError, match="keep_rate"):
        reduce_tokens_(m, TokenReduceConfig(method="evit", keep_rate=1.5))
    with pytest.raises(EffVisionError, match="no handler for ResNet"):
        reduce_tokens_(timm.create_model("resnet10t", num_classes=2), TokenReduceConfig())


@pytest.mark.parametrize("cfg", [TokenReduceConfig(r=8, schedule="decreasing"),
                                 TokenReduceConfig(method="evit", keep_rate=0.6)])
def test_persist_and_export(tmp_path, cfg):
    """The spec's record rebuilds the reduced model without pickle; the ONNX export
    matches eager within 1e-4 at batch 1 and 4, has no scatter ops and passes the TensorRT check."""
    spec = ModelSpec(name="vit_micro_patch4_32", num_classes=10)
    model = create_model(spec).eval()
    reduce_tokens_(model, cfg)
    save_model(model, spec, tmp_path / "model")
    assert json.loads((tmp_path / "model" / "model.json").read_text())["modes"][0]["mode"] == "reduce_tokens"
    loaded, _ = load_model(tmp_path / "model")
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(loaded.eval()(x), model(x))
    out = export_model_dir(tmp_path / "model", tmp_path / "onnx", OnnxExportConfig(parity_batch_sizes=[1, 4]))
    assert out["parity"]["max_abs_error"] <= 1e-4
    graph = onnx.load(out["onnx"])
    ops = {n.op_type for n in graph.graph.node}
    assert not ops & {"ScatterElements", "ScatterND", "Scatter"}, ops
    assert "TopK" in ops
    assert check_tensorrt(graph) == []


def test_stage_preflight_rejects_before_the_run(tmp_path):
    """A merge count too large for the recipe's model fails the CLI's preflight: exit 2, no run dir."""
    from effvision.cli import main

    out = tmp_path / "run"
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart_tome.yaml"
    rc = main(["run", str(recipe), "--out", str(out), "--set", "stages.1.r=40"])
    assert rc == 2 and not out.exists()


def test_evit_keep_rate_schedule_ramps_to_the_target():
    """Fine-tuning's keep-rate schedule: all tokens at step 0, the target's counts from the end of
    the ramp on (the counts reduce_tokens_ set), in between in between; non-EViT models refused."""
    from effvision.dynamic.keep_schedule import KeepScheduleConfig, apply_keep_schedule, keep_rate_at
    from effvision.engine import Hooks

    cfg = TokenReduceConfig(method="evit", keep_rate=0.5)
    m = _vit()
    target = reduce_tokens_(m, cfg)
    hooks = Hooks()
    apply_keep_schedule(m, KeepScheduleConfig(ramp=0.5), hooks, "stages[1].keep_schedule")
    x = torch.randn(1, 3, 32, 32)

    def tokens_after_last_block(step: int) -> int:
        hooks.before_step[0](m, step, 100)
        return m._features(x)[0].shape[1]

    assert tokens_after_last_block(0) == 65 and tokens_after_last_block(50) == target[-1] == tokens_after_last_block(99)
    assert target[-1] < tokens_after_last_block(25) < 65
    assert keep_rate_at(0.5, 25, 100, 0.5) == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="not EViT-pruned"):
        apply_keep_schedule(_vit(), KeepScheduleConfig(), Hooks(), "stages[1].keep_schedule")
    with pytest.raises(ConfigError, match=r"keep_schedule.ramp: 1.0 is outside"):
        KeepScheduleConfig(ramp=1.0).validate("stages[1].keep_schedule")


# ---------------------------------------------------------------- a slow reference of ToMe and EViT
def _ref_attention(blk: torch.nn.Module, h: torch.Tensor, size: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention written out: softmax(q k^T * scale + log(size of key)) v, the full matrix.
    h [B, N, C], size [B, N, 1] or None -> (output [B, N, C], keys averaged over heads [B, N, hd],
    attention probabilities [B, H, N, N])."""
    attn = blk.attn
    B, N, C = h.shape
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim)
    q, k, v = attn.q_norm(qkv[:, :, 0]), attn.k_norm(qkv[:, :, 1]), qkv[:, :, 2]   # [B, N, H, hd]
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * attn.scale
    if size is not None:
        logits = logits + size[:, None, None, :, 0].log()    # token j stands for size_j tokens
    p = logits.softmax(-1)
    o = torch.einsum("bhij,bjhd->bihd", p, v).reshape(B, N, C)
    return attn.proj(o), k.mean(2), p


def _ref_tome_merge(x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, r: int, prefix: int
                    ) -> tuple[list[tuple[torch.Tensor, float]], float]:
    """ToMe on one image, token by token: alternate patch tokens form sets A and B; each A token's
    partner is its most cosine-similar B token (keys); the r A tokens most similar to their partner
    merge into it by size-weighted mean. Returns the (token, size) pairs after the prefix, and the
    similarity margin between the r-th merged and the first unmerged A token (the choice is
    unambiguous only if it is clear)."""
    patches = list(range(prefix, x.shape[0]))
    a_set, b_set = patches[0::2], patches[1::2]
    best: dict[int, tuple[float, int]] = {}
    for a in a_set:
        sims = [float(torch.dot(keys[a], keys[b]) / (keys[a].norm() * keys[b].norm())) for b in b_set]
        j = max(range(len(b_set)), key=lambda i: sims[i])
        best[a] = (sims[j], b_set[j])
    ranked = sorted(a_set, key=lambda a: -best[a][0])
    merged, unmerged = ranked[:r], ranked[r:]
    total = {t: x[t] * size[t] for t in unmerged + b_set}
    count = {t: float(size[t]) for t in unmerged + b_set}
    for a in merged:
        dst = best[a][1]
        total[dst] = total[dst] + x[a] * size[a]
        count[dst] += float(size[a])
    margin = best[ranked[r - 1]][0] - best[ranked[r]][0]
    return [(total[t] / count[t], count[t]) for t in unmerged + b_set], margin


def _tie_break(n: int) -> float:
    """The widest score gap that tokens.ordered_topk's index tie-break (1e-6 per index) can
    reorder among n scores: the reference's choice must clear it to be the implementation's too."""
    return 1e-6 * n


def _canonical(rows: torch.Tensor) -> torch.Tensor:
    """Rows [M, C] in a fixed order (by their first value): compares token sets whatever their order."""
    return rows[rows[:, 0].argsort()]


def _double_vit() -> torch.nn.Module:
    """vit_micro in float64 (exact comparisons) with sharper attention than the init's near-uniform
    one, so which tokens are most attended or most similar is decided by clear margins."""
    m = _vit().double()
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.qkv.weight.mul_(10.0)
    return m


def test_tome_block_matches_a_loop_reference_with_proportional_attention() -> None:
    """A ToMe block on tokens of unequal sizes: attention with log(size) on the logits, keys
    averaged over heads as the metric, and the r most similar A tokens merged into their best B
    token by size-weighted mean, against the loop reference; merging the least similar pairs or
    dropping the size bias fails here."""
    m = _double_vit()
    r, prefix = 8, m.num_prefix_tokens
    reduce_tokens_(m, TokenReduceConfig(r=r))
    blk = m.blocks[0]
    torch.manual_seed(1)
    x = torch.randn(2, 65, m.embed_dim, dtype=torch.float64)
    size = torch.randint(1, 5, (2, 65, 1)).double()
    size[:, :prefix] = 1.0
    with torch.no_grad():
        y, y_size = blk(x, size)
        a, keys, _ = _ref_attention(blk, blk.norm1(x), size)
        x1 = x + a
        assert y.shape == (2, 65 - r, m.embed_dim) and y_size.shape == (2, 65 - r, 1)
        for i in range(2):
            tokens, margin = _ref_tome_merge(x1[i], size[i, :, 0], keys[i], r, prefix)
            assert margin > _tie_break(32), "the seed must make the r most similar pairs unambiguous"
            ref_x = torch.cat([x1[i, :prefix], torch.stack([t for t, _ in tokens])])
            ref_x = ref_x + blk.mlp(blk.norm2(ref_x))
            ref_s = torch.tensor([1.0] * prefix + [s for _, s in tokens], dtype=torch.float64)
            torch.testing.assert_close(y[i, :prefix], ref_x[:prefix], rtol=0, atol=1e-9)  # prefix first, never merged
            # Tokens after the prefix as a set (their order is the implementation's): each with its size.
            got = torch.cat([y[i, prefix:], y_size[i, prefix:]], dim=1)
            want = torch.cat([ref_x[prefix:], ref_s[prefix:, None]], dim=1)
            torch.testing.assert_close(_canonical(got), _canonical(want), rtol=0, atol=1e-9)


def test_evit_block_keeps_the_most_attended_tokens_against_a_loop_reference() -> None:
    """An EViT pruning block: the kept patch tokens are those with the highest CLS attention
    (averaged over heads, from the full attention matrix), the rest fused into one last token
    weighted by that attention, against the loop reference; keeping the least attended fails here."""
    m = _double_vit()
    reduce_tokens_(m, TokenReduceConfig(method="evit", keep_rate=0.5))
    blk, prefix = m.blocks[1], m.num_prefix_tokens
    keep = blk.evit_keep
    assert keep == 32
    torch.manual_seed(9)
    x = torch.randn(2, 65, m.embed_dim, dtype=torch.float64)
    with torch.no_grad():
        y, _ = blk(x, None)
        a, _, p = _ref_attention(blk, blk.norm1(x), None)
        x1 = x + a
        assert y.shape == (2, prefix + keep + 1, m.embed_dim)
        for i in range(2):
            score = p[i, :, 0, prefix:].mean(0)                              # CLS row, mean over heads
            ranked = sorted(range(score.numel()), key=lambda j: -float(score[j]))
            kept, rest = ranked[:keep], ranked[keep:]
            assert score[kept[-1]] - score[rest[0]] > _tie_break(64), "the seed must make the top-k unambiguous"
            w = score[rest]
            fused = sum(w[j] * x1[i, prefix + t] for j, t in enumerate(rest)) / w.sum()
            ref_x = torch.cat([x1[i, :prefix], x1[i, [prefix + t for t in kept]], fused[None]])
            ref_x = ref_x + blk.mlp(blk.norm2(ref_x))
            torch.testing.assert_close(y[i, :prefix], ref_x[:prefix], rtol=0, atol=1e-9)
            torch.testing.assert_close(y[i, -1], ref_x[-1], rtol=0, atol=1e-9)       # the fused token, last
            torch.testing.assert_close(_canonical(y[i, prefix:-1]), _canonical(ref_x[prefix:-1]), rtol=0, atol=1e-9)
