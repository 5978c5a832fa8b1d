"""Tests for SparseDiT's blocks (paper Sec. 3.1): Poolingformer, sparse-token
generation, dense recovery.

References are computed another way: explicit per-head softmax attention with hand-written
LayerNorm, adaptive pooling with bins built from the index formula, nearest / bilinear upsampling
by gathering rows and columns (or with interpolation matrices).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import randomize
from sparsedit.core.blocks import DenseRecoveryBlock, Poolingformer, SparseGenerationBlock
from sparsedit.core.layers import DiTBlock, sincos_pos_embed_2d

TOL = 1e-5


# ------------------------------------------------------------------------------------------------
# independent reference pieces
# ------------------------------------------------------------------------------------------------


def layer_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return x @ w.T + b


def gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ada(sd: dict[str, Tensor], c: Tensor, chunks: int = 6) -> list[Tensor]:
    """adaLN regressor by hand: SiLU then linear, split into (B, 1, D) vectors."""
    out = linear(c * torch.sigmoid(c), sd["adaLN_modulation.1.weight"], sd["adaLN_modulation.1.bias"])
    return [v[:, None, :] for v in out.chunk(chunks, dim=-1)]


def mlp(sd: dict[str, Tensor], x: Tensor) -> Tensor:
    hidden = gelu_tanh(linear(x, sd["mlp.fc1.weight"], sd["mlp.fc1.bias"]))
    return linear(hidden, sd["mlp.fc2.weight"], sd["mlp.fc2.bias"])


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, scores: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d_h)) v per head, or softmax(``scores``) v when a score matrix is given."""
    b, n, d = q.shape
    dh = d // heads
    out = []
    for h in range(heads):
        qh, kh, vh = (t[..., h * dh : (h + 1) * dh] for t in (q, k, v))
        s = qh @ kh.transpose(1, 2) / math.sqrt(dh) if scores is None else scores
        out.append(torch.softmax(s, dim=-1) @ vh)
    return torch.cat(out, dim=-1)


def reference_block(sd: dict[str, Tensor], x: Tensor, c: Tensor, heads: int, context: Tensor | None = None) -> Tensor:
    """A DiT block with (cross-)attention from its state dict, every step by hand."""
    d = x.shape[-1]
    s1, sc1, g1, s2, sc2, g2 = ada(sd, c)
    xq = layer_norm(x) * (1 + sc1) + s1
    kv_in = xq if context is None else layer_norm(context) * (1 + sc1) + s1
    w, bias = sd["attn.qkv.weight"], sd["attn.qkv.bias"]
    q = linear(xq, w[:d], bias[:d])
    k = linear(kv_in, w[d : 2 * d], bias[d : 2 * d])
    v = linear(kv_in, w[2 * d :], bias[2 * d :])
    attn = linear(explicit_attention(q, k, v, heads), sd["attn.proj.weight"], sd["attn.proj.bias"])
    x = x + g1 * attn
    return x + g2 * mlp(sd, layer_norm(x) * (1 + sc2) + s2)


def adaptive_pool_by_hand(tokens: Tensor, dense: tuple[int, int], sparse: tuple[int, int]) -> Tensor:
    """(B, H*W, D) row-major tokens -> (B, h*w, D); bin i covers [floor(i*H/h), ceil((i+1)*H/h))."""
    B, _, D = tokens.shape
    (H, W), (h, w) = dense, sparse
    grid = tokens.reshape(B, H, W, D)
    out = torch.empty(B, h, w, D, dtype=tokens.dtype)
    for i in range(h):
        r0, r1 = (i * H) // h, -((-(i + 1) * H) // h)
        for j in range(w):
            c0, c1 = (j * W) // w, -((-(j + 1) * W) // w)
            out[:, i, j] = grid[:, r0:r1, c0:c1].mean(dim=(1, 2))
    return out.reshape(B, h * w, D)


def nearest_up_by_hand(tokens: Tensor, sparse: tuple[int, int], dense: tuple[int, int]) -> Tensor:
    """Nearest upsampling by gathering: dense cell (i, j) takes sparse cell (floor(i*h/H), floor(j*w/W))."""
    B, _, D = tokens.shape
    (h, w), (H, W) = sparse, dense
    grid = tokens.reshape(B, h, w, D)
    rows = (torch.arange(H) * h) // H
    cols = (torch.arange(W) * w) // W
    return grid[:, rows][:, :, cols].reshape(B, H * W, D)


def bilinear_matrix(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in) 1-D linear interpolation with half-pixel centres (align_corners=False)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[i, i0] += 1 - lam
        m[i, i1] += lam
    return m


def bilinear_up_by_hand(tokens: Tensor, sparse: tuple[int, int], dense: tuple[int, int]) -> Tensor:
    B, _, D = tokens.shape
    (h, w), (H, W) = sparse, dense
    grid = tokens.reshape(B, h, w, D).double()
    out = torch.einsum("Hh,bhwd,Ww->bHWd", bilinear_matrix(h, H), grid, bilinear_matrix(w, W))
    return out.reshape(B, H * W, D).float()


def zero_gates(block: nn.Module) -> None:
    """Make both residual gates zero (adaLN chunks 2 and 5), so the block returns its residual input."""
    lin = block.adaLN_modulation[1]
    d = lin.weight.shape[1]
    with torch.no_grad():
        for chunk in (2, 5):
            lin.weight[chunk * d : (chunk + 1) * d] = 0
            lin.bias[chunk * d : (chunk + 1) * d] = 0


# ------------------------------------------------------------------------------------------------
# Poolingformer
# ------------------------------------------------------------------------------------------------


def poolingformer_from(block: DiTBlock) -> Poolingformer:
    """Load a Poolingformer from a DiT block by hand: V = rows [2D, 3D) of qkv, Q/K dropped."""
    d = block.attn.proj.weight.shape[0]
    pool = Poolingformer(d)
    sd = {k: v for k, v in block.state_dict().items() if not k.startswith("attn.qkv")}
    sd["attn.v.weight"] = block.attn.qkv.weight[2 * d :]
    sd["attn.v.bias"] = block.attn.qkv.bias[2 * d :]
    pool.load_state_dict(sd, strict=True)
    return pool


@pytest.mark.parametrize("heads", [1, 4])
def test_poolingformer_equals_uniform_attention_reference(heads: int) -> None:
    D, N, B = 16, 12, 3
    block = randomize(DiTBlock(D, heads))
    pool = poolingformer_from(block)
    x, c = torch.randn(B, N, D), torch.randn(B, D)
    sd = {k: v.double() for k, v in block.state_dict().items()}
    xd, cd = x.double(), c.double()
    s1, sc1, g1, s2, sc2, g2 = ada(sd, cd)
    xm = layer_norm(xd) * (1 + sc1) + s1
    v = linear(xm, sd["attn.qkv.weight"][2 * D :], sd["attn.qkv.bias"][2 * D :])
    constant_scores = torch.full((N, N), 3.7, dtype=torch.float64)  # any constant: softmax -> 1/N
    attn = linear(explicit_attention(xm, xm, v, heads, constant_scores), sd["attn.proj.weight"], sd["attn.proj.bias"])
    ref = xd + g1 * attn
    ref = ref + g2 * mlp(sd, layer_norm(ref) * (1 + sc2) + s2)
    with torch.no_grad():
        out = pool(x, c)
    assert out.shape == (B, N, D)
    torch.testing.assert_close(out.double(), ref, atol=TOL, rtol=0)
    # the uniform map really matters: the DiT block with its learned attention gives something else
    with torch.no_grad():
        assert not torch.allclose(block(x, c), out, atol=1e-3)


def test_poolingformer_has_no_query_key_parameters() -> None:
    names = set(Poolingformer(16).state_dict())
    assert "attn.v.weight" in names and "attn.proj.weight" in names
    assert not any("qkv" in n or ".q." in n or ".k." in n for n in names)


class _MaxNumel(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_poolingformer_never_materialises_n_by_n() -> None:
    D, N = 16, 1024  # N*N = 1M elements, the largest legitimate tensor is the MLP hidden (N * 4D = 64K)
    block = randomize(DiTBlock(D, 2))
    pool = poolingformer_from(block)
    x, c = torch.randn(1, N, D), torch.randn(1, D)
    with torch.no_grad(), _MaxNumel() as mode:
        pool(x, c)
    assert 0 < mode.max_numel < N * N
    assert mode.max_numel <= N * 4 * D
    # the detector does see an N x N score matrix when one exists (explicit uniform attention)
    with torch.no_grad(), _MaxNumel() as mode:
        explicit_attention(x, x, x, 1, torch.zeros(N, N))
    assert mode.max_numel >= N * N


# ------------------------------------------------------------------------------------------------
# Sparse-token generation block
# ------------------------------------------------------------------------------------------------

DENSE, SPARSE = (6, 10), (3, 5)


@pytest.mark.parametrize(("dense", "sparse"), [((6, 10), (3, 5)), ((7, 10), (3, 4)), ((5, 5), (1, 1))])
def test_generation_pooling_matches_hand_adaptive_pool(dense: tuple[int, int], sparse: tuple[int, int]) -> None:
    D = 8
    gen = randomize(SparseGenerationBlock(D, 2))
    zero_gates(gen)  # the block then returns its pooled tokens Xs0 unchanged
    x, c = torch.randn(2, dense[0] * dense[1], D), torch.randn(2, D)
    with torch.no_grad():
        out = gen(None, c, x, dense, sparse)
    assert out.shape == (2, sparse[0] * sparse[1], D)
    torch.testing.assert_close(out, adaptive_pool_by_hand(x, dense, sparse), atol=1e-6, rtol=0)


def test_generation_pooling_is_row_major() -> None:
    # token n sits at (n // W, n % W): pooling 2x2 bins of an index ramp gives known means
    H, W, D = 2, 4, 4
    gen = SparseGenerationBlock(D, 1)
    zero_gates(gen)
    x = torch.arange(H * W, dtype=torch.float32)[None, :, None].expand(1, H * W, D).contiguous()
    with torch.no_grad():
        out = gen(None, torch.zeros(1, D), x, (H, W), (1, 2))
    # left bin: tokens 0, 1, 4, 5 -> 2.5; right bin: 2, 3, 6, 7 -> 4.5
    torch.testing.assert_close(out[0, :, 0], torch.tensor([2.5, 4.5]))


def test_generation_at_full_grid_equals_dit_block() -> None:
    D = 16
    block = randomize(DiTBlock(D, 2))
    gen = SparseGenerationBlock(D, 2)
    gen.load_state_dict(block.state_dict())
    x, c = torch.randn(2, 60, D), torch.randn(2, D)
    with torch.no_grad():
        assert torch.equal(gen(None, c, x, DENSE, DENSE), block(x, c))


@pytest.mark.parametrize(("dense", "sparse"), [((6, 10), (3, 5)), ((7, 10), (3, 4))])
def test_generation_cross_attention_matches_explicit_reference(dense: tuple[int, int], sparse: tuple[int, int]) -> None:
    D, heads, B = 16, 4, 2
    gen = randomize(SparseGenerationBlock(D, heads))
    x, c = torch.randn(B, dense[0] * dense[1], D), torch.randn(B, D)
    sd = {k: v.double() for k, v in gen.state_dict().items()}
    pooled = adaptive_pool_by_hand(x.double(), dense, sparse)
    ref = reference_block(sd, pooled, c.double(), heads, context=x.double())
    with torch.no_grad():
        out = gen(None, c, x, dense, sparse)
        refined = gen(out, c, x, dense, sparse, pool=False)  # a 2nd generation block (g > 1)
    torch.testing.assert_close(out.double(), ref, atol=TOL, rtol=0)
    ref2 = reference_block(sd, out.double(), c.double(), heads, context=x.double())
    torch.testing.assert_close(refined.double(), ref2, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# Dense-recovery block
# ------------------------------------------------------------------------------------------------


def _recovery(D: int, upsample: str = "nearest") -> DenseRecoveryBlock:
    rec = DenseRecoveryBlock(D, 2, upsample=upsample)
    with torch.no_grad():  # random transformer weights, but keep the paper's W1 = 0, W2 = I
        for name, p in rec.named_parameters():
            if not name.startswith("merge_"):
                p.normal_(0.0, 0.2)
    return rec


def test_recovery_initial_merge_is_w1_zero_w2_identity() -> None:
    rec = DenseRecoveryBlock(8, 2)
    assert torch.count_nonzero(rec.merge_sparse.weight) == 0 and torch.count_nonzero(rec.merge_sparse.bias) == 0
    assert torch.equal(rec.merge_dense.weight, torch.eye(8)) and torch.count_nonzero(rec.merge_dense.bias) == 0


def test_recovery_merged_input_is_dense_plus_pos() -> None:
    D = 16
    rec = _recovery(D)
    x, xs, c = torch.randn(2, 60, D), torch.randn(2, 15, D), torch.randn(2, D)
    pos = sincos_pos_embed_2d(D, *DENSE)[None]
    seen: list[Tensor] = []
    # DiTBlock.forward normalises the context first, then the queries: the 2nd norm1 call sees Xm
    handle = rec.norm1.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        out = rec(x, c, xs, DENSE, SPARSE, pos)
    handle.remove()
    assert torch.equal(seen[0], xs)
    torch.testing.assert_close(seen[1], x + pos, atol=1e-6, rtol=0)
    # and the rest is the DiT block's cross-attention (q = Xm, k = v = Xs) by hand
    sd = {k: v.double() for k, v in rec.state_dict().items()}
    ref = reference_block(sd, (x + pos).double(), c.double(), 2, context=xs.double())
    torch.testing.assert_close(out.double(), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize(("dense", "sparse"), [((6, 10), (3, 5)), ((7, 10), (3, 4)), ((8, 8), (5, 5))])
def test_recovery_nearest_upsample_matches_index_gather(dense: tuple[int, int], sparse: tuple[int, int]) -> None:
    D = 8
    rec = _recovery(D)
    zero_gates(rec)  # output = merged = up(Xs) W1 + X W2 + pos
    with torch.no_grad():
        rec.merge_sparse.weight.copy_(torch.eye(D))  # W1 = I, W2 = 0: output = up(Xs) + pos
        rec.merge_dense.weight.zero_()
    N = dense[0] * dense[1]
    x, xs, c = torch.randn(2, N, D), torch.randn(2, sparse[0] * sparse[1], D), torch.randn(2, D)
    pos = torch.randn(1, N, D)
    with torch.no_grad():
        out = rec(x, c, xs, dense, sparse, pos)
    torch.testing.assert_close(out, nearest_up_by_hand(xs, sparse, dense) + pos, atol=1e-6, rtol=0)


def test_recovery_bilinear_matches_interpolation_matrices() -> None:
    D = 8
    rec = _recovery(D, upsample="bilinear")
    zero_gates(rec)
    with torch.no_grad():
        rec.merge_sparse.weight.copy_(torch.eye(D))
        rec.merge_dense.weight.zero_()
    x, xs, c = torch.randn(1, 60, D), torch.randn(1, 15, D), torch.randn(1, D)
    zero_pos = torch.zeros(1, 60, D)
    with torch.no_grad():
        out = rec(x, c, xs, DENSE, SPARSE, zero_pos)
    torch.testing.assert_close(out, bilinear_up_by_hand(xs, SPARSE, DENSE), atol=1e-5, rtol=0)
    assert not torch.allclose(out, nearest_up_by_hand(xs, SPARSE, DENSE), atol=1e-3)


def test_recovery_nonzero_w1_changes_output() -> None:
    D = 16
    rec = _recovery(D)
    x, xs, c = torch.randn(2, 60, D), torch.randn(2, 15, D), torch.randn(2, D)
    pos = sincos_pos_embed_2d(D, *DENSE)[None]
    with torch.no_grad():
        before = rec(x, c, xs, DENSE, SPARSE, pos)
        rec.merge_sparse.weight.normal_(0.0, 0.2)
        after = rec(x, c, xs, DENSE, SPARSE, pos)
    assert not torch.allclose(before, after, atol=1e-3)
    # with W1 != 0 the merged input is up(Xs) W1 + X + pos (checked through the residual)
    zero_gates(rec)
    with torch.no_grad():
        merged = rec(x, c, xs, DENSE, SPARSE, pos)
        expected = nearest_up_by_hand(xs, SPARSE, DENSE) @ rec.merge_sparse.weight.T + x + pos
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)


def test_recovery_rejects_unknown_upsample_mode() -> None:
    with pytest.raises(ValueError, match="upsample"):
        DenseRecoveryBlock(8, 2, upsample="area")
