"""Building blocks shared by every transformer in sparsedit.

Key and module names follow the official DiT release (https://github.com/facebookresearch/DiT,
``models.py``) so that an official state dict maps onto ours name for name; the code is our own.
Shapes: B = batch, N = tokens, D = hidden size, H/W = token grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: (B, N, D) tokens with (B, D) shift/scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, output ``[cos, sin]``: (B,) -> (B, dim).

    ``freq_shift`` is the denominator shift of the frequency ladder: the official DiT uses
    ``exp(-ln(P) * i / half)`` (shift 0), diffusers' ``Timesteps(downscale_freq_shift=1)`` divides
    by ``half - 1``. The operation order matches each writer so loaded models reproduce it exactly.
    """
    half = dim // 2
    idx = torch.arange(half, dtype=torch.float32, device=t.device)
    if freq_shift == 0.0:
        freqs = torch.exp(-math.log(max_period) * idx / half)
    else:
        freqs = torch.exp(-math.log(max_period) * idx / (half - freq_shift))
    args = t[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding, (grid_h * grid_w, dim), tokens in row-major order.

    Layout as in MAE/DiT: the first half of the channels encodes the column (w) coordinate, the
    second half the row (h) coordinate; each half is ``[sin, cos]`` over ``dim/4`` frequencies.
    Computed in float64 like the numpy original, then cast to float32.
    """
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2-D sin-cos embedding")
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)  # (N,)
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)  # (N,)

    def embed_1d(pos: Tensor) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
        out = pos[:, None] * omega[None]  # (N, dim/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> D-dim vectors: sinusoidal features then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_embedding(t, self.frequency_size, freq_shift=self.freq_shift)  # (B, 256)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class labels -> D-dim vectors; the extra last row is the "null" class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: Tensor, force_drop: Tensor | None = None) -> Tensor:
        # Label dropout (training only) teaches the null class used by classifier-free guidance.
        if force_drop is not None:
            labels = torch.where(force_drop.bool(), self.num_classes, labels)
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """(B, C, H*p, W*p) image -> (B, H*W, D) tokens with a strided convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head attention with fused q/k/v weights (``qkv``: q, k, v stacked in that order).

    ``forward(x)`` is self-attention; ``forward(x, context)`` takes queries from ``x`` and keys/values
    from ``context`` with the same weights (SparseDiT's sparse-token generation and dense recovery
    reuse a pretrained self-attention this way). ``attn_fn`` is swappable (e.g. to record attention
    maps); it defaults to ``F.scaled_dot_product_attention``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_fn: AttentionFn = F.scaled_dot_product_attention

    def _heads(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)  # (B, h, N, d/h)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        if context is None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, N, D)
        else:
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[:d], None if bias is None else bias[:d])  # (B, N, D)
            k, v = F.linear(context, w[d:], None if bias is None else bias[d:]).chunk(2, dim=-1)  # (B, M, D)
        out = self.attn_fn(self._heads(q), self._heads(k), self._heads(v))  # (B, h, N, d/h)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Transformer MLP: fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def init_linears_and_patch_embed(model: nn.Module, patch_embed: PatchEmbed, linear_gain: float = 1.0) -> None:
    """The DiT family's base initialisation: every linear xavier-uniform with zero bias, and the patch
    embedding's conv initialised like a linear (xavier on its weight flattened to (D, C*p*p)), zero bias.

    ``linear_gain`` scales the linears' xavier bound (1 in DiT; the SparseDiT authors' training code
    uses 0.5); the patch embedding keeps gain 1 in both. Models then re-initialise their embedders and
    zero their adaLN / output layers on top of this.
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, gain=linear_gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(patch_embed.proj.bias)


def adaln_modulation(hidden_size: int, chunks: int) -> nn.Sequential:
    """``SiLU -> Linear(D, chunks*D)``: the adaLN-Zero regressor (keys ``adaLN_modulation.1``)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning; ``forward(x, c, context=None)``.

    With ``context`` the attention is cross-attention: queries from ``x``, keys/values from
    ``context`` (normalised and modulated like ``x``); the residual stream is always ``x``.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
        mlp_norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = adaln_modulation(hidden_size, 6)

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        if context is not None:
            # Keys/values see the same norm + modulation as the queries, as in self-attention.
            context = modulate(self.norm1(context), shift_msa, scale_msa)  # (B, M, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), context)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> linear projection to p*p*C_out values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm_eps: float = 1e-6):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = adaln_modulation(hidden_size, 2)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: Tensor, grid: tuple[int, int], patch_size: int, channels: int) -> Tensor:
    """(B, H*W, p*p*C) tokens -> (B, C, H*p, W*p) image."""
    h, w = grid
    p = patch_size
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)
