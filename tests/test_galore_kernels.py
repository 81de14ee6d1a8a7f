"""GaLore's Triton kernels against their PyTorch references, on the CPU under
TRITON_INTERPRET=1, on shapes that are not multiples of the block sizes.

Tolerances: the fp32 kernels do the reference's arithmetic (in a possibly different order,
FMA contraction), so 1e-6 relative; 8-bit codes may differ by one step where a value sits on
a rounding boundary, so codes agree within 1 and the directions within the quantization
error of one code."""
from __future__ import annotations

import importlib

import pytest
import torch

from effvision.kernels import _triton
from effvision.kernels import quant8 as Q

pytestmark = pytest.mark.skipif(not _triton.HAVE_TRITON, reason="triton is not installed")

SHAPES = [(113, 203), (3000,), (1,), (257,), (17, 31, 3)]


@pytest.fixture
def K():
    """kernels.galore_adam with its kernels built for the interpreter (they are built at import).
    Afterwards the module is rebuilt under the run's own TRITON_INTERPRET (set or not), so no
    later test sees kernels built for another mode than the one its environment says."""
    import effvision.kernels.galore_adam as mod
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield importlib.reload(mod)
    importlib.reload(mod)


def _state(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(*shape, generator=g)
    m = 0.1 * torch.randn(*shape, generator=g)
    v = 0.01 * torch.rand(*shape, generator=g)
    return grad, m, v


@pytest.mark.parametrize("shape", SHAPES)
def test_adam_direction_kernel_matches_reference(K, shape) -> None:
    grad, m, v = _state(shape)
    m2, v2 = m.clone(), v.clone()
    assert K.use_triton(grad)
    out = K.adam_direction(grad, m, v, 0.9, 0.999, 1e-6)
    ref = K.adam_direction_ref(grad, m2, v2, 0.9, 0.999, 1e-6)
    torch.testing.assert_close(m, m2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v, v2, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_adam_dense_kernel_writes_the_weight(K, shape, dtype) -> None:
    grad, m, v = _state(shape)
    p = torch.randn(*shape).to(dtype)
    p2, m2, v2 = p.clone(), m.clone(), v.clone()
    K.adam_dense(p, grad.to(dtype), m, v, 0.9, 0.999, 1e-6, 1e-2, 0.999)
    K.adam_dense_ref(p2, grad.to(dtype), m2, v2, 0.9, 0.999, 1e-6, 1e-2, 0.999)
    # bf16: the kernel rounds once (fp32 math, one store), the reference twice (add, then mul)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(p, p2, **tol)
    torch.testing.assert_close(m, m2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
def test_adam_8bit_kernel_matches_reference(K, shape) -> None:
    grad, m, v = _state(shape)
    mq, ma = Q.quantize_m_ref(m)
    vq, va = Q.quantize_v_ref(v)
    st = [mq.clone(), ma.clone(), vq.clone(), va.clone()]
    st_ref = [t.clone() for t in st]
    out = K.adam_direction_8bit(grad, *st, 0.9, 0.999, 1e-6)
    ref = K.adam_direction_8bit_ref(grad, *st_ref, 0.9, 0.999, 1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st[1], st_ref[1], rtol=1e-6, atol=0)   # absmax per block
    torch.testing.assert_close(st[3], st_ref[3], rtol=1e-6, atol=0)
    for a, b in ((st[0], st_ref[0]), (st[2], st_ref[2])):
        assert (a.int() - b.int()).abs().max() <= 1
    p, p2 = torch.randn(*shape), None
    p2 = p.clone()
    st2 = [t.clone() for t in st_ref]
    K.adam_dense_8bit(p, grad, *st_ref, 0.9, 0.999, 1e-6, 1e-2, 0.99)
    K.adam_dense_8bit_ref(p2, grad, *st2, 0.9, 0.999, 1e-6, 1e-2, 0.99)
    torch.testing.assert_close(p, p2, rtol=1e-5, atol=1e-5)


def test_8bit_roundtrip_keeps_small_values() -> None:
    """Companded codes: SQNR over 30 dB on Gaussian moments, and a non-zero second moment never
    dequantizes to 0 when it is within 1e-8 of its block's max (linear codes lose it at 1/255)."""
    torch.manual_seed(0)
    m = torch.randn(10_000) * torch.logspace(-3, 0, 10_000)
    back = Q.dequantize_m_ref(*Q.quantize_m_ref(m))
    sqnr = 10 * torch.log10(m.pow(2).sum() / (m - back).pow(2).sum())
    assert sqnr > 30, float(sqnr)
    v = torch.rand(Q.QBLOCK) * 1e-8
    v[0] = 1.0
    vq = Q.dequantize_v_ref(*Q.quantize_v_ref(v))
    assert (vq[v > 1e-9] > 0).all()


@pytest.mark.parametrize("opt_name", ["GaLoreAdamW", "GaLoreAdamW8bit"])
def test_optimizer_takes_the_kernel_path_and_agrees(K, monkeypatch, opt_name) -> None:
    """The optimizers pick the kernels at run time (here: the interpreter); the result equals
    the reference path's (EFFVISION_NO_TRITON=1) to fp32 tolerance."""
    import effvision.optim as O

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(70, 300))   # galore, 70 x 16 state
        b = torch.nn.Parameter(torch.randn(5000))      # dense, above min_8bit_size
        opt = getattr(O, opt_name)([{"params": [w], "rank": 16, "update_proj_gap": 2}, {"params": [b]}],
                                   lr=1e-2, weight_decay=0.1)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            w.grad = torch.randn(70, 300, generator=g)
            b.grad = torch.randn(5000, generator=g)
            opt.step()
        return [w.detach().clone(), b.detach().clone()]

    kernel = run()
    monkeypatch.setenv("EFFVISION_NO_TRITON", "1")
    assert not K.use_triton(torch.zeros(1))
    reference = run()
    for a, b in zip(kernel, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
