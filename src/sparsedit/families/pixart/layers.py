"""PixArt-alpha's layers: the caption embedder, the text cross-attention and its padding mask, the adaLN-single
block and the final layer (https://github.com/PixArt-alpha/PixArt-alpha; module names only, the code is ours)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsedit.core.layers import (
    Attention,
    Mlp,
    modulate,
)
from sparsedit.errors import SparseditError


def match_batch(x: Tensor, batch: int, what: str) -> Tensor:
    """Repeat a batch of 1 or B/k rows up to ``batch`` (the original repeats masks the same way)."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] and batch % x.shape[0] == 0:
        return x.repeat(batch // x.shape[0], *([1] * (x.ndim - 1)))
    raise SparseditError(f"{what} has batch {x.shape[0]}, which does not divide the latent batch {batch}")


def text_attention_mask(mask: Tensor | None, batch: int, length: int, bias: float | None = None,
                        dtype: torch.dtype = torch.float32) -> Tensor | None:
    """A caption mask -> the SDPA mask of the text cross-attention, (B, 1, 1, L), or None.

    Accepts a (B, L) keep-mask (1/True = real token, 0/False = padding) or diffusers' ready-made
    additive bias (B, 1, L), used as given. A keep-mask becomes a boolean mask (``bias`` None) or the
    additive bias ``(1 - mask) * bias`` in ``dtype`` (diffusers' conversion with bias -10000). With the
    boolean mask a row that keeps no token attends to all tokens uniformly, as a finite bias gives.
    """
    if mask is None:
        return None
    if mask.ndim == 3:  # additive bias, 0 = keep, large negative = drop
        return match_batch(mask, batch, "encoder_attention_mask")[:, None].to(dtype)  # (B, 1, 1, L)
    if mask.ndim != 2 or mask.shape[1] != length:
        raise SparseditError(
            f"encoder_attention_mask of shape {tuple(mask.shape)} does not fit {length} caption tokens; "
            "pass (B, L) with 1 for real tokens and 0 for padding"
        )
    mask = match_batch(mask, batch, "encoder_attention_mask")
    if bias is not None:
        return ((1 - mask.to(dtype)) * bias)[:, None, None, :]  # (B, 1, 1, L)
    keep = mask != 0  # (B, L)
    keep = keep | ~keep.any(dim=1, keepdim=True)
    return keep[:, None, None, :]  # (B, 1, 1, L)


def _heads(x: Tensor, num_heads: int) -> Tensor:
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)  # (B, h, N, d/h)


class TextCrossAttention(nn.Module):
    """Image queries attend to caption tokens: ``q_linear``, ``kv_linear`` (k, v stacked), ``proj``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, text: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        q = _heads(self.q_linear(x), self.num_heads)  # (B, h, N, d/h)
        k, v = (_heads(z, self.num_heads) for z in self.kv_linear(text).chunk(2, dim=-1))  # (B, h, L, d/h)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, d/h)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class PixArtBlock(nn.Module):
    """Self-attention, text cross-attention and MLP under adaLN-single; ``forward(x, c, context=None)``.

    ``c`` is a :class:`PixArtCond`. With ``context`` the self-attention becomes cross-attention
    (queries from ``x``, keys/values from ``context``, normalised and modulated like ``x``), as in
    :class:`sparsedit.core.layers.DiTBlock`. ``cross_attention=False`` builds a block without the text
    attention (Latte's temporal blocks).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 cross_attention: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.attn: nn.Module = Attention(hidden_size, num_heads)
        self.cross_attn = TextCrossAttention(hidden_size, num_heads) if cross_attention else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def modulation(self, t0: Tensor) -> tuple[Tensor, ...]:
        """shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, D)."""
        return (self.scale_shift_table[None] + t0.view(t0.shape[0], 6, -1)).unbind(1)

    def text_attention(self, x: Tensor, c: PixArtCond) -> Tensor:
        if self.cross_attn is None:
            return x
        if c.text is None:
            raise SparseditError("this block attends to text but the condition carries no caption tokens")
        return x + self.cross_attn(x, c.text, c.mask)  # no norm, no gate (PixArt)

    def forward(self, x: Tensor, c: PixArtCond, context: Tensor | None = None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c.t0)
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (B, N, D)
        if context is None:
            attn = self.attn(h)  # (B, N, D); (B, 1, D) for a poolingformer, broadcast below
        else:
            attn = self.attn(h, modulate(self.norm1(context), shift_msa, scale_msa))  # (B, N, D)
        x = x + gate_msa.unsqueeze(1) * attn  # (B, N, D)
        x = self.text_attention(x, c)  # (B, N, D)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class PixArtFinalLayer(nn.Module):
    """``scale_shift_table`` [2, D] + embedded timestep -> (shift, scale); LayerNorm, modulate, linear."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).unbind(1)  # 2 x (B, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C_out)


class CaptionEmbedder(nn.Module):
    """T5 tokens -> D: ``y_proj`` = fc1 (C_text -> D), GELU(tanh), fc2 (D -> D); optional null caption.

    ``y_embedding`` [L, C_text] is a buffer, as in the original (stored, never trained); in training,
    captions are replaced by it with probability ``dropout_prob`` to teach classifier-free guidance.
    """

    def __init__(self, in_channels: int, hidden_size: int, null_length: int, dropout_prob: float):
        super().__init__()
        self.dropout_prob = dropout_prob
        self.y_proj = Mlp(hidden_size, hidden_size)
        self.y_proj.fc1 = nn.Linear(in_channels, hidden_size)
        self.y_embedding: Tensor | None
        if null_length > 0:
            self.register_buffer("y_embedding", torch.randn(null_length, in_channels) / in_channels**0.5)
        else:
            self.y_embedding = None

    def forward(self, caption: Tensor) -> Tensor:
        if self.training and self.dropout_prob > 0 and self.y_embedding is not None:
            if caption.shape[1:] != self.y_embedding.shape:
                raise SparseditError(
                    f"caption dropout needs captions shaped like the null caption {tuple(self.y_embedding.shape)}, "
                    f"got {tuple(caption.shape[1:])}; pad captions to {self.y_embedding.shape[0]} tokens"
                )
            drop = torch.rand(caption.shape[0], device=caption.device) < self.dropout_prob
            caption = torch.where(drop[:, None, None], self.y_embedding.to(caption.dtype), caption)
        return self.y_proj(caption)  # (B, L, D)


@dataclass
class PixArtCond:
    """The per-block condition ``c`` of a PixArt (what a DiT's ``c`` vector is to a DiT block).

    ``t0`` (B, 6D): the shared adaLN-single vector; ``emb`` (B, D): the embedded timestep (plus size
    conditions) that modulates the final layer; ``text`` (B, L, D): projected caption tokens, None
    for blocks without cross-attention (e.g. Latte's temporal blocks); ``mask``: SDPA-ready text
    mask, (B, 1, 1, L) boolean keep-mask or additive bias, None = attend to every token.
    """

    t0: Tensor
    emb: Tensor
    text: Tensor | None = None
    mask: Tensor | None = None
