"""The block-sparse attention kernel against its SDPA reference, on the CPU under
TRITON_INTERPRET=1: sequence lengths that are not multiples of the block, random and empty
mask rows, fp32 and fp16, forward and backward. Tiny shapes: the interpreter is slow."""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from effvision.kernels import _triton

pytestmark = pytest.mark.skipif(not _triton.HAVE_TRITON, reason="triton is not installed")


@pytest.fixture
def K():
    """kernels.block_sparse_attention with its kernels built for the interpreter. Triton fixes a
    kernel's mode when the module is imported, while ``use_triton`` reads TRITON_INTERPRET at each
    call: so the environment is restored first (not deleted: the run may have set it), then the
    module is rebuilt for it, or later tests would launch GPU kernels on CPU tensors."""
    import effvision.kernels.block_sparse_attention as mod
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield importlib.reload(mod)
    importlib.reload(mod)


def _inputs(b, h, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("n,d,dtype", [(37, 32, torch.float32), (50, 64, torch.float16), (16, 32, torch.float32)])
def test_kernel_matches_reference_fwd_bwd(K, n, d, dtype) -> None:
    blk, h = 16, 2
    q, k, v = _inputs(2, h, n, d, dtype)
    nb = -(-n // blk)
    mask = torch.rand(h, nb, nb, generator=torch.Generator().manual_seed(1)) < 0.5
    mask[0, 0] = False            # an empty query block: defined (zero) output and gradients
    mask[1, :, 0] = True
    assert K.use_triton(q)
    out = K.block_sparse_attention(q, k, v, mask, block=blk)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    # the reference in fp32 (what the kernel accumulates in)
    qf, kf, vf = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = K.block_sparse_attention_ref(qf, kf, vf, mask, block=blk)
    ref.backward(grad.float())
    want = [ref.detach()] + [t.grad for t in (qf, kf, vf)]
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b, **tol)
    assert out[0, 0, :blk].abs().max() == 0


def test_full_mask_equals_dense_sdpa(K) -> None:
    q, k, v = _inputs(1, 1, 23, 32, torch.float32)
    out = K.block_sparse_attention(q, k, v, torch.ones(1, 2, 2, dtype=torch.bool), block=16)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-4, atol=1e-5)


def test_bad_mask_shape_is_one_line_error(K) -> None:
    q, k, v = _inputs(1, 2, 40, 32, torch.float32)
    with pytest.raises(ValueError, match=r"shape \(heads=2, 3, 3\)"):
        K.block_sparse_attention(q, k, v, torch.ones(3, 3, 3, dtype=torch.bool), block=16)
    with pytest.raises(ValueError, match="bool"):
        K.block_sparse_attention(q, k, v, torch.ones(2, 3, 3), block=16)


def test_unsupported_head_dim_falls_back_with_one_warning(K) -> None:
    q, k, v = _inputs(1, 1, 20, 24, torch.float32)
    mask = torch.tensor([[[True, False], [True, True]]])
    with pytest.warns(UserWarning, match="head dim 24"):
        out = K.block_sparse_attention(q, k, v, mask, block=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K.block_sparse_attention(q, k, v, mask, block=16)      # warned once only
    torch.testing.assert_close(out, K.block_sparse_attention_ref(q, k, v, mask, block=16))
