"""FLUX.1 (Black Forest Labs, 2024): the dense rectified-flow MMDiT of FLUX.1-dev and FLUX.1-schnell.

The model (https://github.com/black-forest-labs/flux, ``src/flux/model.py`` and ``modules/layers.py``):

* the 16-channel latent (B, 16, H, W) is packed 2 x 2 into (B, H/2 * W/2, 64) tokens and embedded by a Linear
  (``img_in``); the T5 caption (B, L, 4096) by another (``txt_in``);
* one conditioning vector ``vec`` = MLP(timestep) [+ MLP(guidance), FLUX.1-dev only] + MLP(CLIP pooled text, 768);
* ``depth_double`` double-stream blocks: image and text tokens keep their own weights (adaLN modulation, q/k/v,
  output projection, MLP) and meet in one joint attention over [text; image];
* ``depth_single`` single-stream blocks on the joint sequence: one fused Linear gives q/k/v and the MLP input,
  a second one maps [attention; GELU(MLP)] back (attention and MLP in parallel);
* q and k are RMS-normalised per head (learned scale) and rotated by a 3-axis RoPE: text tokens sit at (0, 0, 0),
  image token (i, j) at (0, i, j), with 16 / 56 / 56 of the 128 head channels for the three axes, theta 10000;
* a final adaLN (shift, scale) + Linear back to 64 packed channels, unpacked to (B, 16, H, W).

Module and key names follow the original release (``img_in``, ``double_blocks.i.img_attn.qkv``,
``single_blocks.i.linear1``, ...), except that both block lists are one ``blocks`` list (double blocks first),
so the cost counter and a later sparse model see every block in order; ``convert.py`` maps the original and the
diffusers names. The numerics follow diffusers' ``FluxTransformer2DModel`` op for op: on CPU the outputs are
bit-identical in float32, bfloat16 and float16 (tests/test_flux.py checks 1e-5 of the output's scale). The code is
our own.

Timesteps are ``sigma * 1000`` in [0, 1000] (the scale the rest of sparsedit uses; diffusers' transformer takes
sigma and multiplies by 1000 inside, the original takes sigma and multiplies inside ``timestep_embedding``).
The guidance of FLUX.1-dev is the guidance scale itself (3.5 by default in FluxPipeline); the model multiplies it by
1000 in its own dtype, as both originals do. Shapes: B batch, L text tokens, N = h * w image tokens, S = L + N,
D hidden, H heads, Dh head channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sparsedit.core.layers import FinalLayer, modulate, timestep_embedding
from sparsedit.errors import SparseditError
from sparsedit.families.dit.model import GridConfig

Grid = tuple[int, int]
Rope = tuple[Tensor, Tensor]  # (cos, sin), each (S, Dh)

# Both released FLUX.1 transformers (black-forest-labs/flux src/flux/util.py ``configs``).
FLUX_DEPTHS = (19, 38)  # double-stream, single-stream blocks
FLUX_HIDDEN, FLUX_HEADS = 3072, 24  # head dim 128
FLUX_AXES = (16, 56, 56)  # RoPE channels of (unused, row, column)
FLUX_LATENT_CHANNELS = 16  # the FLUX VAE's latent (8x downsampling, like the SD VAE)
T5_CHANNELS = 4096  # T5-XXL
CLIP_POOLED = 768  # CLIP-L pooled output
# Caption length the pipelines pad T5 to: FluxPipeline's max_sequence_length 512; the original CLI uses 256 for
# schnell (``load_t5(max_length=256 if name == "flux-schnell" else 512)``, black-forest-labs/flux src/flux/cli.py).
FLUX_TEXT_TOKENS = {"FLUX.1-dev": 512, "FLUX.1-schnell": 256}
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's guidance_scale default (FLUX.1-dev's embedded guidance)
QK_NORM_EPS = 1e-6
LAYER_NORM_EPS = 1e-6
FP16_MAX = 65504.0


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


@dataclass
class FluxConfig(GridConfig):
    """Everything needed to rebuild a FLUX.1 transformer; saved as ``config.json`` beside the weights.

    ``input_size`` is the (unpacked) latent, ``patch_size`` the packing (2: the token grid is (H/2, W/2)),
    ``in_channels`` the latent's channels (16; the packed tokens have ``in_channels * patch_size**2`` = 64).
    The model runs on any latent size and caption length: ``input_size`` and ``max_sequence_length`` are the
    defaults costs, benchmarks and random conditioning use.
    """

    input_size: int | tuple[int, int] = 128  # latent size, H or (H, W): 1024 px
    patch_size: int = 2
    in_channels: int = FLUX_LATENT_CHANNELS
    hidden_size: int = FLUX_HIDDEN
    depth_double: int = FLUX_DEPTHS[0]
    depth_single: int = FLUX_DEPTHS[1]
    num_heads: int = FLUX_HEADS
    mlp_ratio: float = 4.0
    caption_channels: int = T5_CHANNELS
    pooled_channels: int = CLIP_POOLED
    guidance_embeds: bool = False  # FLUX.1-dev: True (guidance-distilled); FLUX.1-schnell: False
    axes_dims_rope: tuple[int, int, int] = FLUX_AXES
    rope_theta: float = 10000.0
    max_sequence_length: int = 512  # T5 tokens of a caption (512 dev, 256 schnell)
    data_space: str = "latent"
    model_type: str = field(default="FLUX", init=False)

    # A velocity with the latent's channels, no learned variance (GridConfig.out_channels reads this). A plain class
    # attribute: no annotation, so it is no dataclass field (a ClassVar would still be listed in __dataclass_fields__).
    learn_sigma = False

    def __post_init__(self) -> None:
        if isinstance(self.axes_dims_rope, list):  # JSON
            self.axes_dims_rope = tuple(self.axes_dims_rope)  # type: ignore[assignment]
        self.check_input("; FLUX packs 2x2 latent patches, so pick an image size divisible by 16")
        if self.hidden_size % self.num_heads:
            raise SparseditError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if len(self.axes_dims_rope) != 3 or any(d % 2 or d < 2 for d in self.axes_dims_rope):
            raise SparseditError(f"axes_dims_rope {list(self.axes_dims_rope)} must be three positive even numbers")
        if sum(self.axes_dims_rope) != self.head_dim:
            raise SparseditError(f"axes_dims_rope {list(self.axes_dims_rope)} sums to {sum(self.axes_dims_rope)}, "
                                 f"not the head dim {self.head_dim} (hidden_size / num_heads)")
        if min(self.depth_double, self.depth_single) < 0 or self.depth < 1:
            raise SparseditError(f"depth_double {self.depth_double} and depth_single {self.depth_single} must be >= 0 "
                                 "with at least one block")
        if self.mlp_ratio <= 0 or self.rope_theta <= 0:
            raise SparseditError(f"mlp_ratio {self.mlp_ratio} and rope_theta {self.rope_theta} must be positive")
        if self.max_sequence_length < 1:
            raise SparseditError(f"max_sequence_length must be positive, got {self.max_sequence_length}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def depth(self) -> int:
        """All blocks, double-stream then single-stream (``model.blocks``)."""
        return self.depth_double + self.depth_single

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def flux_config(preset: str = "FLUX.1-dev", image_size: int = 1024, vae_downsample: int = 8,
                **overrides: Any) -> FluxConfig:
    """FLUX.1-dev or FLUX.1-schnell at ``image_size`` px (the latent is image / 8, the token grid image / 16)."""
    if preset not in FLUX_TEXT_TOKENS:
        raise SparseditError(f"unknown FLUX preset {preset!r}; choose one of {', '.join(FLUX_TEXT_TOKENS)}")
    if image_size % (2 * vae_downsample):
        raise SparseditError(f"image size {image_size} is not a multiple of 16 (FLUX packs 2x2 latent patches)")
    kwargs: dict[str, Any] = dict(input_size=image_size // vae_downsample, guidance_embeds=preset == "FLUX.1-dev",
                                  max_sequence_length=FLUX_TEXT_TOKENS[preset])
    kwargs.update(overrides)
    return FluxConfig(**kwargs)


# ------------------------------------------------------------------------------------------------
# packing and rotary positions
# ------------------------------------------------------------------------------------------------


def pack_latents(x: Tensor, patch_size: int = 2) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C * p * p) tokens, channels ordered (c, dy, dx) as FluxPipeline packs them."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack_latents(tokens: Tensor, grid: Grid, patch_size: int = 2) -> Tensor:
    """The inverse of :func:`pack_latents`: (B, h * w, C * p * p) -> (B, C, h * p, w * p)."""
    b, n, cpp = tokens.shape
    (h, w), p = grid, patch_size
    if n != h * w:
        raise SparseditError(f"{n} tokens do not fill a {h}x{w} grid")
    x = tokens.reshape(b, h, w, cpp // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
    return x.reshape(b, cpp // (p * p), h * p, w * p)


def position_ids(grid: Grid, text_len: int, device: torch.device | str | None = None) -> Tensor:
    """(L + N, 3) RoPE positions: L text tokens at (0, 0, 0), then image token (i, j) at (0, i, j), row-major
    (FluxPipeline's ``txt_ids`` and ``_prepare_latent_image_ids``, concatenated text first)."""
    h, w = grid
    ids = torch.zeros(text_len + h * w, 3, device=device)
    ids[text_len:, 1] = torch.arange(h, device=device).repeat_interleave(w).float()
    ids[text_len:, 2] = torch.arange(w, device=device).repeat(h).float()
    return ids


def rope_table(ids: Tensor, axes_dims: tuple[int, ...], theta: float) -> Rope:
    """(cos, sin), each (S, Dh) float32, for positions ``ids`` (S, 3).

    Axis ``a`` takes ``axes_dims[a]`` channels: angles ``pos * theta ** (-2k / d)`` for k < d/2, each repeated
    for the two channels of a rotated pair. Computed in float64 and cast to float32, as diffusers' FluxPosEmbed
    (float32 where the device has no float64: MPS).
    """
    dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=ids.device) / dim)  # (d/2,)
        angles = ids[:, axis].float()[:, None] * freqs[None]  # (S, d/2), float64 by promotion
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())  # (S, d)
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate (B, H, S, Dh) queries or keys: channel pairs (2k, 2k+1) as complex numbers, in float32."""
    cos, sin = rope  # (S, Dh)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (B, H, S, Dh/2) each
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)  # (B, H, S, Dh): i * x
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def batch_values(v: Tensor | float, batch: int, name: str, device: torch.device) -> Tensor:
    """A number, a one-element or a (B,) tensor -> (B,) values."""
    v = torch.as_tensor(v, device=device).reshape(-1)
    if v.numel() not in (1, batch):
        raise SparseditError(f"got {v.numel()} {name} for a batch of {batch}; pass one or one per sample")
    return v.expand(batch)


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear: the timestep, guidance and pooled-text embedders."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim with a learned ``scale`` (the original's name for the weight)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.scale, eps=QK_NORM_EPS)


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys (keeps attention logits bounded)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)


class Modulation(nn.Module):
    """``vec`` -> ``chunks`` (B, D) modulation vectors (shift, scale, gate, ...) through SiLU and one Linear."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.lin = nn.Linear(dim, chunks * dim)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.lin(F.silu(vec)).chunk(self.chunks, dim=1)  # chunks x (B, D)


class StreamAttention(nn.Module):
    """One stream's half of a joint attention: fused q/k/v, QK-norm, output projection (the original's
    ``SelfAttention``). The attention itself is :func:`joint_attention`, over both streams."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, D) -> normalised q, k and v, each (B, H, N, Dh)."""
        return split_heads(self.qkv(x), self.num_heads, self.norm)


def split_heads(qkv: Tensor, num_heads: int, norm: QKNorm) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N, 3D) fused projections -> q, k, v each (B, H, N, Dh), q and k RMS-normalised per head."""
    b, n, _ = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
    return norm.query_norm(q), norm.key_norm(k), v


def joint_attention(q: Tensor, k: Tensor, v: Tensor, rope: Rope) -> Tensor:
    """Attention of (B, H, S, Dh) queries, keys, values with RoPE on q and k -> (B, S, H * Dh)."""
    out = F.scaled_dot_product_attention(apply_rope(q, rope), apply_rope(k, rope), v)  # (B, H, S, Dh)
    return out.transpose(1, 2).flatten(2)  # (B, S, D)


def clip_fp16(x: Tensor) -> Tensor:
    """diffusers clamps the residual stream to the float16 range after a block, so half precision stays finite
    (an inf would turn every later block into NaN); a no-op in other dtypes."""
    return x.clip(-FP16_MAX, FP16_MAX) if x.dtype == torch.float16 else x


def mlp(dim: int, hidden: int) -> nn.Sequential:
    """Linear -> GELU(tanh) -> Linear (keys ``0`` and ``2``, as the original's ``img_mlp`` / ``txt_mlp``)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Image and text tokens with separate weights, one joint attention over [text; image].

    ``forward(img (B, N, D), txt (B, L, D), vec (B, D), rope) -> (img, txt)``; each stream:
    ``x += gate1 * proj(attn(modulate(LN(x))))``, then ``x += gate2 * MLP(modulate(LN(x)))``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", Modulation(dim, 6))
            self.add_module(f"{stream}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS))
            self.add_module(f"{stream}_attn", StreamAttention(dim, num_heads))
            self.add_module(f"{stream}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS))
            self.add_module(f"{stream}_mlp", mlp(dim, mlp_hidden))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)  # 6 x (B, D)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.heads(modulate(self.img_norm1(img), img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.heads(modulate(self.txt_norm1(txt), txt_shift1, txt_scale1))
        joint = joint_attention(torch.cat([txt_q, img_q], dim=2), torch.cat([txt_k, img_k], dim=2),
                                torch.cat([txt_v, img_v], dim=2), rope)  # (B, L + N, D)
        length = txt.shape[1]
        # Contiguous slices: a strided input takes another half-precision matmul kernel (1-ulp differences to diffusers).
        img_attn, txt_attn = joint[:, length:].contiguous(), joint[:, :length].contiguous()
        img = img + img_gate1.unsqueeze(1) * self.img_attn.proj(img_attn)  # (B, N, D)
        img = img + img_gate2.unsqueeze(1) * self.img_mlp(modulate(self.img_norm2(img), img_shift2, img_scale2))
        txt = txt + txt_gate1.unsqueeze(1) * self.txt_attn.proj(txt_attn)  # (B, L, D)
        txt = txt + txt_gate2.unsqueeze(1) * self.txt_mlp(modulate(self.txt_norm2(txt), txt_shift2, txt_scale2))
        return img, clip_fp16(txt)  # diffusers clamps only the text stream here


class SingleStreamBlock(nn.Module):
    """One stream over [text; image] with attention and MLP in parallel:
    ``x += gate * linear2([attn(q, k, v); GELU(m)])`` with ``[q, k, v, m] = linear1(modulate(LN(x)))``.

    ``forward(img (B, N, D), txt (B, L, D), vec (B, D), rope) -> (img, txt)``, like a double-stream block.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.num_heads = num_heads
        self.mlp_hidden = mlp_hidden
        self.linear1 = nn.Linear(dim, 3 * dim + mlp_hidden)
        self.linear2 = nn.Linear(dim + mlp_hidden, dim)
        self.norm = QKNorm(dim // num_heads)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(dim, 3)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        length = txt.shape[1]
        x = torch.cat([txt, img], dim=1)  # (B, S, D)
        shift, scale, gate = self.modulation(vec)  # 3 x (B, D)
        qkv, hidden = self.linear1(modulate(self.pre_norm(x), shift, scale)).split(
            [3 * x.shape[-1], self.mlp_hidden], dim=-1)  # (B, S, 3D), (B, S, F)
        attn = joint_attention(*split_heads(qkv, self.num_heads, self.norm), rope)  # (B, S, D)
        x = clip_fp16(x + gate.unsqueeze(1) * self.linear2(torch.cat([attn, self.mlp_act(hidden)], dim=2)))
        return x[:, length:], x[:, :length]


# ------------------------------------------------------------------------------------------------
# FLUX
# ------------------------------------------------------------------------------------------------


class Flux(nn.Module):
    """FLUX.1: pack -> ``depth_double`` double-stream blocks -> ``depth_single`` single-stream blocks -> final layer.

    ``forward(x, t, encoder_hidden_states, pooled_projections, guidance=None)`` maps latents (B, C, H, W),
    timesteps (B,) in [0, 1000] (sigma * 1000), T5 embeddings (B, L, 4096), CLIP pooled embeddings (B, 768) and,
    for a guidance-distilled model (FLUX.1-dev), the guidance scale (B,) to the velocity (B, C, H, W). Any latent
    size divisible by 2 and any caption length work; captions take no mask (neither original has one).
    """

    config: FluxConfig

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        d, p = config.hidden_size, config.patch_size
        self.img_in = nn.Linear(config.in_channels * p * p, d)
        self.time_in = MLPEmbedder(256, d)
        self.vector_in = MLPEmbedder(config.pooled_channels, d)
        self.guidance_in = MLPEmbedder(256, d) if config.guidance_embeds else None
        self.txt_in = nn.Linear(config.caption_channels, d)
        self.blocks = self.build_blocks(config)
        # The original's LastLayer: LN, adaLN (shift, scale), Linear to the packed channels.
        self.final_layer = FinalLayer(d, p, config.out_channels, norm_eps=LAYER_NORM_EPS)
        # Parameters keep PyTorch's default initialisation, as in both originals (FLUX is loaded, not trained anew).

    def build_blocks(self, config: FluxConfig) -> nn.ModuleList:
        """One list, double-stream blocks first: the block loop, the cost counter and a sparse model see them in order
        (SparseFLUX overrides this with its block kinds, so a sparse model never builds the dense blocks first)."""
        d, heads, hidden = config.hidden_size, config.num_heads, config.mlp_hidden
        return nn.ModuleList([DoubleStreamBlock(d, heads, hidden) for _ in range(config.depth_double)]
                             + [SingleStreamBlock(d, heads, hidden) for _ in range(config.depth_single)])

    def token_grid(self, x: Tensor) -> Grid:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise SparseditError(f"x of shape {tuple(x.shape)}: expected (B, {cfg.in_channels}, H, W) latents")
        h, w = x.shape[-2:]
        if h % cfg.patch_size or w % cfg.patch_size:
            raise SparseditError(f"latent {h}x{w} is not divisible by the patch size {cfg.patch_size}")
        return h // cfg.patch_size, w // cfg.patch_size

    def rope(self, grid: Grid, text_len: int, device: torch.device) -> Rope:
        """(cos, sin) of [text; image] tokens, each (L + N, Dh)."""
        return rope_table(position_ids(grid, text_len, device), self.config.axes_dims_rope, self.config.rope_theta)

    def conditioning_vector(self, t: Tensor, pooled: Tensor, guidance: Tensor | None, dtype: torch.dtype) -> Tensor:
        """(B,) timesteps, (B, 768) pooled text, (B,) guidance -> (B, D) ``vec``."""
        cfg = self.config
        if pooled.ndim != 2 or pooled.shape[1] != cfg.pooled_channels:
            raise SparseditError(f"pooled_projections of shape {tuple(pooled.shape)}: expected (B, "
                                 f"{cfg.pooled_channels}) pooled CLIP embeddings")
        vec = self.time_in(timestep_embedding(t, 256).to(dtype))  # [cos, sin], shift 0, as both originals
        if self.guidance_in is not None:
            if guidance is None:
                raise SparseditError("this FLUX is guidance-distilled (FLUX.1-dev): pass guidance (B,), the guidance "
                                     f"scale, e.g. {DEFAULT_GUIDANCE}")
            g = batch_values(guidance, t.shape[0], "guidance", t.device)
            # The guidance scale is multiplied by 1000 in the model's dtype, as diffusers and the original do.
            vec = vec + self.guidance_in(timestep_embedding(g.to(dtype) * 1000, 256).to(dtype))
        elif guidance is not None:
            raise SparseditError("this FLUX has no guidance embedding (FLUX.1-schnell style); pass guidance=None")
        return vec + self.vector_in(pooled.to(dtype))  # (B, D)

    def embed(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor,
              guidance: Tensor | None) -> tuple[Grid, Tensor, Tensor, Tensor, Tensor]:
        """Checked inputs -> (token grid, image tokens (B, N, D), text tokens (B, L, D), ``vec`` (B, D), timesteps
        (B,)): everything before the first block (shared with SparseFLUX, which also needs the timesteps)."""
        cfg = self.config
        grid = self.token_grid(x)
        b = x.shape[0]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.caption_channels:
            raise SparseditError(f"encoder_hidden_states of shape {tuple(encoder_hidden_states.shape)}: expected "
                                 f"(B, L, {cfg.caption_channels}) T5 embeddings")
        if encoder_hidden_states.shape[0] != b or pooled_projections.shape[0] != b:
            raise SparseditError(f"a batch of {b} latents got {encoder_hidden_states.shape[0]} captions and "
                                 f"{pooled_projections.shape[0]} pooled embeddings; pass one per latent")
        img = self.img_in(pack_latents(x, cfg.patch_size))  # (B, N, D)
        t = batch_values(t, b, "timesteps", x.device)
        vec = self.conditioning_vector(t, pooled_projections, guidance, img.dtype)  # (B, D)
        txt = self.txt_in(encoder_hidden_states.to(img.dtype))  # (B, L, D)
        return grid, img, txt, vec, t

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor,
                guidance: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W), t: (B,) in [0, 1000], encoder_hidden_states: (B, L, C_text), pooled_projections:
        (B, C_pooled), guidance: (B,) or None -> (B, C, H, W)."""
        grid, img, txt, vec, _ = self.embed(x, t, encoder_hidden_states, pooled_projections, guidance)
        rope = self.rope(grid, txt.shape[1], x.device)  # 2 x (L + N, Dh)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                img, txt = checkpoint(block, img, txt, vec, rope, use_reentrant=False)
            else:
                img, txt = block(img, txt, vec, rope)  # (B, N, D), (B, L, D)
        out = self.final_layer(img, vec)  # (B, N, p*p*C)
        return unpack_latents(out, grid, self.config.patch_size)  # (B, C, H, W)
