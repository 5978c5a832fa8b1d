"""Wan 2.1 / 2.2 (Alibaba Wan team, 2025): the dense video diffusion transformer of Wan2.1-T2V-1.3B / 14B, the
Wan2.1 image-to-video models and each of the two experts of Wan2.2-A14B.

The model (https://github.com/Wan-Video/Wan2.1, ``wan/modules/model.py``; numerics as diffusers'
``WanTransformer3DModel``):

* the video latent (B, C, F, H, W) of the Wan VAE (4x in time, 8x in space, 16 channels) is cut into
  ``patch_frames`` x ``patch_size`` x ``patch_size`` patches by a Conv3d (``patch_embedding``): N = F * h * w tokens,
  frame-major, then row-major, as the Conv3d's output flattens;
* the umT5 caption (B, 512, 4096) is embedded by Linear -> GELU(tanh) -> Linear (``text_embedding``); the image-to-video
  models also take 257 CLIP ViT-H image tokens (B, 257, 1280), embedded by LN -> Linear -> GELU -> Linear -> LN
  (``img_emb``);
* one timestep embedding ``temb`` = MLP(sinusoid(t)) (``time_embedding``) and from it one shared modulation
  ``e`` = Linear(SiLU(temb)) of 6 vectors (``time_projection``); each block adds its own learned ``modulation``
  table (1, 6, D) to ``e`` (shift, scale, gate of the self-attention; shift, scale, gate of the FFN);
* ``depth`` blocks: self-attention with q / k RMS-normalised over all heads at once (one weight of width D) and rotated
  by a 3-axis RoPE, then cross-attention to the caption (after an affine LayerNorm, ``norm3``; for I2V plus a second
  attention of the same queries to the image tokens, ``k_img`` / ``v_img``, added), then a GELU(tanh) FFN of width
  ``ffn_dim``;
* the RoPE splits each head's channels into frame / row / column parts (``rope_axes``: 44 / 42 / 42 of 128), theta
  10000, angles in float64 as diffusers' WanRotaryPosEmbed; tables are computed from token positions
  (:func:`token_positions`), so a sparse model can give pooled tokens fractional positions;
* the output head: LayerNorm modulated by ``temb`` + its own table (1, 2, D) (shift, scale), Linear to
  ``patch_frames * patch_size**2 * out_channels``, unpatchified to (B, C_out, F, H, W).

Module and key names are those of the original release (``self_attn.q``, ``cross_attn.k_img``, ``norm3`` for the
cross-attention norm, ``ffn.0``, ``head.head``, ``img_emb.proj.1``, ...), so the original files load name for name;
``convert.py`` maps diffusers' names. The numerics follow diffusers op for op, including where it computes in float32:
the LayerNorms, the modulation sums, the residual updates, the timestep MLP in its own weights' dtype (the code is our
own), and keeps diffusers' memory layouts where bfloat16 rounding depends on them: on CPU the outputs are bit-identical
in float32, bfloat16 and float16 (tests/test_wan.py). Diffusers keeps ``time_embedder``, the ``scale_shift_table`` s and
the cross-attention / image norms in float32 when it loads a model in a lower precision; ``convert.keeps_fp32`` names
those tensors and ``convert.cast_like_diffusers`` casts a model the same way (``model.to(dtype)`` casts everything, as
diffusers' own ``.to`` does).

Timesteps are ``sigma * 1000`` in [0, 1000], what WanPipeline passes its transformer. Shapes: B batch, F latent frames,
(h, w) token grid per frame, N = F * h * w tokens, L caption tokens, D hidden, H heads, Dh head channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sparsedit.core.layers import timestep_embedding
from sparsedit.errors import SparseditError
from sparsedit.families.dit.model import GridConfig

Grid = tuple[int, int]
Rope = tuple[Tensor, Tensor]  # (cos, sin), each (N, Dh / 2) float32

WAN_TEXT_DIM = 4096  # umT5-XXL
WAN_TEXT_TOKENS = 512  # the pipelines pad every caption to 512 umT5 tokens (and I2V attention splits there)
WAN_IMAGE_TOKENS = 257  # CLIP ViT-H/14 at 224 px: 16 x 16 patches + the class token
WAN_VAE_STRIDE = (4, 8, 8)  # the Wan 2.1 VAE: frames 1 + 4k -> 1 + k latent frames, 8x8 pixels per latent
ROPE_THETA = 10000.0  # fixed in diffusers' WanRotaryPosEmbed
QK_NORM = "rms_norm_across_heads"  # the only q / k norm of the releases (and of diffusers' attention)
# Pixel (height, width) of the pipelines' two resolutions; any other --image-size is a square.
WAN_RESOLUTIONS = {480: (480, 832), 720: (720, 1280)}
WAN_14B = dict(hidden_size=5120, num_heads=40, depth=40, ffn_dim=13824)
# The released transformers (their diffusers config.json: heads x 128 channels, layers, FFN width, I2V fields).
WAN_PRESETS: dict[str, dict[str, Any]] = {
    "Wan2.1-T2V-1.3B": dict(hidden_size=1536, num_heads=12, depth=30, ffn_dim=8960),
    "Wan2.1-T2V-14B": WAN_14B,
    "Wan2.1-I2V-14B-480P": dict(WAN_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120),
    "Wan2.2-T2V-A14B": WAN_14B,  # one expert; both experts have this size (docs/wan.md)
}


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


@dataclass
class WanConfig(GridConfig):
    """Everything needed to rebuild a Wan transformer; saved as ``config.json`` beside the weights.

    ``input_size`` is one latent frame (H, W) and ``num_frames`` the latent frames (21 for an 81-frame video); the
    model runs on any size divisible by the patches, these are the defaults costs, benchmarks and sampling use.
    ``in_channels`` is what the model takes (36 for Wan2.1 I2V: 16 noisy + 4 mask + 16 image-condition channels),
    ``out_channels`` what it predicts (16). ``image_dim`` / ``added_kv_proj_dim`` are set together for the CLIP image
    tokens of the Wan2.1 I2V models; ``pos_embed_seq_len`` adds FLF2V's learned positions to the two images' tokens.
    ``max_sequence_length`` is the caption length the pipelines pad to; ``rope_max_seq_len`` is kept for the
    diffusers config only (our RoPE tables have no maximum).
    """

    input_size: int | tuple[int, int] = (60, 104)  # latent (H, W) of one frame: 480 x 832 px
    num_frames: int = 21  # latent frames: 81 video frames
    patch_size: int = 2  # spatial patch
    patch_frames: int = 1  # temporal patch
    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 1536
    depth: int = 30
    num_heads: int = 12
    ffn_dim: int = 8960
    caption_channels: int = WAN_TEXT_DIM
    freq_dim: int = 256
    qk_norm: str = QK_NORM
    cross_attn_norm: bool = True
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    pos_embed_seq_len: int | None = None
    rope_max_seq_len: int = 1024
    max_sequence_length: int = WAN_TEXT_TOKENS
    data_space: str = "latent"
    model_type: str = field(default="Wan", init=False)

    learn_sigma = False  # a velocity, no learned variance (no annotation: not a dataclass field)

    def __post_init__(self) -> None:
        self.check_input("; Wan cuts 2x2 latent patches, so pick an image size divisible by 16")
        for name in ("num_frames", "patch_frames", "in_channels", "out_channels", "depth", "num_heads", "ffn_dim",
                     "caption_channels", "freq_dim", "max_sequence_length"):
            if getattr(self, name) < 1:
                raise SparseditError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_frames % self.patch_frames:
            raise SparseditError(f"{self.num_frames} latent frames are not divisible by patch_frames {self.patch_frames}")
        if self.hidden_size % self.num_heads or self.head_dim % 2 or self.head_dim < 6:
            raise SparseditError(f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must give an even head "
                                 "dim of at least 6 (the RoPE splits it over frames, rows and columns)")
        if self.qk_norm != QK_NORM:
            raise SparseditError(f"qk_norm {self.qk_norm!r} is not supported; Wan's attention always RMS-normalises q "
                                 f"and k across heads ({QK_NORM!r}, also what diffusers does whatever the setting)")
        if self.freq_dim % 2 or self.eps <= 0:
            raise SparseditError(f"freq_dim {self.freq_dim} must be even and eps {self.eps} positive")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise SparseditError("image_dim and added_kv_proj_dim go together (the CLIP image tokens of Wan2.1 I2V); "
                                 "set both or neither")
        if self.added_kv_proj_dim not in (None, self.hidden_size):
            raise SparseditError(f"added_kv_proj_dim {self.added_kv_proj_dim} must be the hidden size "
                                 f"{self.hidden_size} (the image tokens are embedded to it first)")
        if self.pos_embed_seq_len is not None and (self.image_dim is None or self.pos_embed_seq_len < 2):
            raise SparseditError("pos_embed_seq_len (FLF2V's two images) needs image_dim and at least 2 positions")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """Head channels of the (frame, row, column) RoPE axes: rows and columns 2 * (Dh // 6) each, frames the rest."""
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw

    @property
    def token_frames(self) -> int:
        """Token frames of the default input (latent frames / patch_frames)."""
        return self.num_frames // self.patch_frames

    @property
    def video_frames(self) -> int:
        """Video frames of ``num_frames`` latent frames (the VAE keeps the first frame and packs 4 per latent)."""
        return (self.num_frames - 1) * WAN_VAE_STRIDE[0] + 1

    @property
    def image_conditioned(self) -> bool:
        return self.image_dim is not None


def wan_pixel_size(image_size: int) -> tuple[int, int]:
    """``--image-size`` -> pixel (height, width): 480 -> 480 x 832 and 720 -> 720 x 1280 (the pipelines' sizes), any
    other size a square."""
    return WAN_RESOLUTIONS.get(image_size, (image_size, image_size))


def latent_frames(video_frames: int) -> int:
    """Latent frames of a video: the VAE keeps the first frame and packs every 4 after it (81 -> 21)."""
    if video_frames < 1 or (video_frames - 1) % WAN_VAE_STRIDE[0]:
        raise SparseditError(f"{video_frames} video frames: Wan videos have 4k + 1 frames (81, 121, ...)")
    return (video_frames - 1) // WAN_VAE_STRIDE[0] + 1


def wan_config(preset: str = "Wan2.1-T2V-1.3B", image_size: int = 480, video_frames: int = 81,
               **overrides: Any) -> WanConfig:
    """A released Wan transformer at ``image_size`` (480 -> 480 x 832 px) and ``video_frames`` (81 -> 21 latents)."""
    if preset not in WAN_PRESETS:
        raise SparseditError(f"unknown Wan preset {preset!r}; choose one of {', '.join(WAN_PRESETS)}")
    h, w = wan_pixel_size(image_size)
    s = WAN_VAE_STRIDE[1]
    if h % (2 * s) or w % (2 * s):
        raise SparseditError(f"image size {h}x{w} is not a multiple of 16 (the VAE's 8x times the 2x2 patches)")
    kwargs: dict[str, Any] = dict(WAN_PRESETS[preset], input_size=(h // s, w // s), num_frames=latent_frames(video_frames))
    kwargs.update(overrides)
    return WanConfig(**kwargs)


# ------------------------------------------------------------------------------------------------
# rotary positions
# ------------------------------------------------------------------------------------------------


def token_positions(frames: int, grid: Grid, device: torch.device | str | None = None) -> Tensor:
    """(F * h * w, 3) positions (frame, row, column) of a full token grid, in the order the tokens are flattened
    (frame-major, then row-major). float64 (float32 on MPS): a sparse model may place pooled tokens between them."""
    dtype = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64
    f = torch.arange(frames, dtype=dtype, device=device)
    i = torch.arange(grid[0], dtype=dtype, device=device)
    j = torch.arange(grid[1], dtype=dtype, device=device)
    return torch.stack(torch.meshgrid(f, i, j, indexing="ij"), dim=-1).reshape(-1, 3)


def rope_table(positions: Tensor, axes: tuple[int, int, int], theta: float = ROPE_THETA) -> Rope:
    """(cos, sin), each (S, Dh / 2) float32, of positions (S, 3): axis ``a`` takes ``axes[a]`` channels, i.e. the
    angles ``pos * theta ** (-2k / d)`` for k < d / 2, one per rotated channel pair.

    The angles are computed in float64 and cast, as diffusers' table (``get_1d_rotary_pos_embed(..., freqs_dtype=
    float64)``), whose repeated pairs we store once.
    """
    dtype = torch.float32 if positions.device.type == "mps" else torch.float64
    cos, sin = [], []
    for axis, dim in enumerate(axes):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=positions.device) / dim)  # (d/2,)
        angles = positions[:, axis].to(dtype)[:, None] * freqs[None]  # (S, d/2)
        cos.append(angles.cos().float())
        sin.append(angles.sin().float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate (B, S, H, Dh) queries or keys: channel pairs (2k, 2k + 1) by the angles of ``rope`` (S, Dh / 2).

    The products are taken with the float32 tables (promoting bfloat16 inputs) and the result cast back, as diffusers.
    """
    cos, sin = (r[:, None] for r in rope)  # (S, 1, Dh/2): broadcast over heads
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, Dh/2) each
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------


def fp32_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """A LayerNorm computed in float32 (weights included), returned in float32: diffusers' FP32LayerNorm."""
    w, b = norm.weight, norm.bias
    return F.layer_norm(x.float(), norm.normalized_shape, None if w is None else w.float(),
                        None if b is None else b.float(), norm.eps)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(B, Sq, H, Dh) queries, (B, Sk, H, Dh) keys and values -> (B, Sq, H * Dh): SDPA on heads-first views, the
    layout diffusers' native attention hands it."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, Sq, Dh)
    return out.transpose(1, 2).flatten(2).type_as(q)


class SelfAttention(nn.Module):
    """Multi-head self-attention with q / k RMS-normalised across heads and rotated by the 3-axis RoPE."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=eps)  # over all heads at once: one weight of width D
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: Tensor, rope: Rope) -> Tensor:
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(2, heads)  # (B, N, H, Dh)
        k = self.norm_k(self.k(x)).unflatten(2, heads)
        v = self.v(x).unflatten(2, heads)
        return self.o(attention(apply_rope(q, rope), apply_rope(k, rope), v))  # (B, N, D)


class CrossAttention(nn.Module):
    """Attention of the video tokens to the caption; for I2V the context starts with ``image_tokens`` CLIP image
    tokens, attended to by the same queries with their own k / v (keys RMS-normalised), the output added before ``o``.

    The image and caption tokens arrive joined, and each projection reads its slice of them, because that is how
    diffusers lays them out: a Linear on a strided view rounds differently in bfloat16 than on a packed copy.
    """

    def __init__(self, dim: int, num_heads: int, eps: float, image: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.k_img = nn.Linear(dim, dim) if image else None
        self.v_img = nn.Linear(dim, dim) if image else None
        self.norm_k_img = nn.RMSNorm(dim, eps=eps) if image else None

    def forward(self, x: Tensor, context: Tensor, image_tokens: int) -> Tensor:
        """x (B, N, D), context (B, image_tokens + L, D) -> (B, N, D)."""
        heads = (self.num_heads, -1)
        image, text = context[:, :image_tokens], context[:, image_tokens:]
        q = self.norm_q(self.q(x)).unflatten(2, heads)  # (B, N, H, Dh)
        k = self.norm_k(self.k(text)).unflatten(2, heads)  # (B, L, H, Dh)
        out = attention(q, k, self.v(text).unflatten(2, heads))  # (B, N, D)
        if image_tokens and self.k_img is not None and self.v_img is not None and self.norm_k_img is not None:
            k_img = self.norm_k_img(self.k_img(image)).unflatten(2, heads)  # (B, 257, H, Dh)
            out = out + attention(q, k_img, self.v_img(image).unflatten(2, heads))
        return self.o(out)  # (B, N, D)


class WanBlock(nn.Module):
    """Self-attention, cross-attention, FFN; the self-attention and the FFN are adaLN-modulated and gated by
    ``e + modulation`` (6 vectors), the cross-attention is a plain residual after its own affine LayerNorm."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float, cross_attn_norm: bool, image: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps) if cross_attn_norm else None  # the original's name: before norm2
        self.cross_attn = CrossAttention(dim, num_heads, eps, image)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: Tensor, context: Tensor, image_tokens: int, e: Tensor, rope: Rope) -> Tensor:
        """x (B, N, D), context (B, image_tokens + L, D), e (B, 6, D), rope -> (B, N, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e.float()).chunk(6, dim=1)  # (B, 1, D), fp32
        h = (fp32_norm(self.norm1, x) * (1 + scale1) + shift1).type_as(x)
        x = (x.float() + self.self_attn(h, rope) * gate1).type_as(x)
        h = (x.float() if self.norm3 is None else fp32_norm(self.norm3, x)).type_as(x)
        x = x + self.cross_attn(h, context, image_tokens)
        h = (fp32_norm(self.norm2, x) * (1 + scale2) + shift2).type_as(x)
        return (x.float() + self.ffn(h).float() * gate2).type_as(x)


class Head(nn.Module):
    """The output layer: LayerNorm modulated by ``temb`` + a learned (1, 2, D) table (shift, scale), then Linear."""

    def __init__(self, dim: int, out_dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x (B, N, D), temb (B, D) -> (B, N, out_dim)."""
        # temb stays in the model's dtype here (unlike in the blocks): the table's float32 promotes the sum.
        shift, scale = (self.modulation + temb.unsqueeze(1)).chunk(2, dim=1)  # (B, 1, D) each
        return self.head((fp32_norm(self.norm, x) * (1 + scale) + shift).type_as(x))


class ImageEmbedding(nn.Module):
    """CLIP image tokens (B, 257, C_img) -> (B, 257, D): LN, Linear, GELU, Linear, LN (the LNs in float32).

    With ``pos_len`` (FLF2V) the tokens of each pair of images are joined, (2B, 257, C) -> (B, 514, C), and a learned
    position table is added first, as diffusers does.
    """

    def __init__(self, in_dim: int, out_dim: int, pos_len: int | None):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim),
                                  nn.LayerNorm(out_dim))
        self.emb_pos = nn.Parameter(torch.zeros(1, pos_len, in_dim)) if pos_len else None

    def forward(self, image: Tensor) -> Tensor:
        if self.emb_pos is not None:
            image = image.reshape(-1, self.emb_pos.shape[1], image.shape[-1]) + self.emb_pos  # (B, 2 * 257, C)
        norm_in, fc1, act, fc2, norm_out = self.proj
        h = fc2(act(fc1(fp32_norm(norm_in, image).to(image.dtype))))  # (B, S, D)
        return fp32_norm(norm_out, h).to(image.dtype)


class WanInputs(NamedTuple):
    """What :meth:`Wan.embed` hands the first block (and a sparse subclass its layout logic)."""

    tokens: Tensor  # (B, N, D)
    frames: int  # token frames
    grid: Grid  # (h, w) tokens per frame
    temb: Tensor  # (B, D) timestep embedding, the head's modulation input
    e: Tensor  # (B, 6, D) the blocks' shared modulation
    context: Tensor  # (B, image_tokens + L, D): the CLIP image tokens (I2V), then the caption tokens
    image_tokens: int  # 257 for I2V (514 for FLF2V), else 0


# ------------------------------------------------------------------------------------------------
# Wan
# ------------------------------------------------------------------------------------------------


class Wan(nn.Module):
    """Wan: patchify -> ``depth`` blocks -> head -> unpatchify.

    ``forward(x, t, encoder_hidden_states, encoder_hidden_states_image=None)`` maps latents (B, C_in, F, H, W),
    timesteps (B,) in [0, 1000] (sigma * 1000), umT5 embeddings (B, L, 4096) and, for I2V, CLIP image embeddings
    (B, 257, 1280) to the velocity (B, C_out, F, H, W). Any latent size divisible by the patches and any caption
    length run; captions take no mask (the pipelines zero the padding and attend to all 512 tokens).
    """

    config: WanConfig

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        d, p, pt = config.hidden_size, config.patch_size, config.patch_frames
        self.patch_embedding = nn.Conv3d(config.in_channels, d, kernel_size=(pt, p, p), stride=(pt, p, p))
        self.text_embedding = nn.Sequential(nn.Linear(config.caption_channels, d), nn.GELU(approximate="tanh"),
                                            nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.img_emb = ImageEmbedding(config.image_dim, d, config.pos_embed_seq_len) if config.image_dim else None
        self.blocks = self.build_blocks(config)
        self.head = Head(d, pt * p * p * config.out_channels, config.eps)

    def build_blocks(self, config: WanConfig) -> nn.ModuleList:
        """The block list (a sparse subclass overrides this with its block kinds)."""
        return nn.ModuleList([WanBlock(config.hidden_size, config.num_heads, config.ffn_dim, config.eps,
                                       config.cross_attn_norm, config.image_conditioned) for _ in range(config.depth)])

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the patch embedding's (the tensors ``convert.keeps_fp32`` names may be float32 beside it)."""
        return self.patch_embedding.weight.dtype

    def token_layout(self, x: Tensor) -> tuple[int, Grid]:
        """(token frames, (h, w)) of latents (B, C_in, F, H, W)."""
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise SparseditError(f"x of shape {tuple(x.shape)}: expected (B, {cfg.in_channels}, F, H, W) video latents")
        f, h, w = x.shape[2:]
        if f % cfg.patch_frames or h % cfg.patch_size or w % cfg.patch_size:
            raise SparseditError(f"latent {f}x{h}x{w} is not divisible by the patch {cfg.patch_frames}x{cfg.patch_size}x"
                                 f"{cfg.patch_size}")
        return f // cfg.patch_frames, (h // cfg.patch_size, w // cfg.patch_size)

    def rope(self, frames: int, grid: Grid, device: torch.device) -> Rope:
        """(cos, sin) of the full token grid, each (N, Dh / 2)."""
        return rope_table(token_positions(frames, grid, device), self.config.rope_axes)

    def embed(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor,
              encoder_hidden_states_image: Tensor | None = None) -> WanInputs:
        """Checked inputs -> everything before the first block (shared with a sparse subclass)."""
        cfg = self.config
        frames, grid = self.token_layout(x)
        b, dtype = x.shape[0], self.dtype
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.caption_channels:
            raise SparseditError(f"encoder_hidden_states of shape {tuple(encoder_hidden_states.shape)}: expected "
                                 f"(B, L, {cfg.caption_channels}) umT5 embeddings")
        if encoder_hidden_states.shape[0] != b:
            raise SparseditError(f"a batch of {b} latents got {encoder_hidden_states.shape[0]} captions; pass one each")
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        if t.numel() not in (1, b):
            raise SparseditError(f"got {t.numel()} timesteps for a batch of {b}; pass one or one per sample")
        t = t.expand(b)
        tokens = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).contiguous()  # (B, N, D)
        freq = timestep_embedding(t, cfg.freq_dim)  # (B, 256) float32, [cos, sin]
        # The timestep MLP runs in its own weights' dtype (float32 where diffusers keeps it so), then the model's.
        temb = self.time_embedding(freq.to(self.time_embedding[0].weight.dtype)).to(dtype)  # (B, D)
        e = self.time_projection(temb).unflatten(1, (6, -1))  # (B, 6, D)
        context = self.text_embedding(encoder_hidden_states.to(dtype))  # (B, L, D)
        image = self.embed_image(encoder_hidden_states_image, b)  # (B, 257, D) or None
        if image is None:
            return WanInputs(tokens, frames, grid, temb, e, context, 0)
        return WanInputs(tokens, frames, grid, temb, e, torch.cat([image, context], dim=1), image.shape[1])

    def embed_image(self, image: Tensor | None, batch: int) -> Tensor | None:
        """CLIP image embeddings (B, 257, C_img) -> (B, 257, D) for an I2V model; None for a text-to-video one."""
        cfg = self.config
        if self.img_emb is None:
            if image is not None:
                raise SparseditError("this Wan takes no image embeddings (text-to-video, or Wan2.2 I2V, which "
                                     "conditions through its input channels only); pass encoder_hidden_states_image=None")
            return None
        if image is None or image.ndim != 3 or image.shape[-1] != cfg.image_dim:
            got = None if image is None else tuple(image.shape)
            raise SparseditError(f"this Wan is image-to-video: pass encoder_hidden_states_image (B, {WAN_IMAGE_TOKENS}, "
                                 f"{cfg.image_dim}) CLIP embeddings, got {got}")
        if image.shape[0] * image.shape[1] != batch * (cfg.pos_embed_seq_len or image.shape[1]):  # FLF2V: 2 per row
            raise SparseditError(f"image embeddings of shape {tuple(image.shape)} do not give one row per latent ({batch})")
        return self.img_emb(image.to(self.dtype))

    def block_tokens(self, layer: int, output: Tensor, batch: int) -> Tensor:
        """Block ``layer``'s output as (B, N, D) (feature distillation taps it); a Wan's hidden states already are."""
        return output

    def unpatchify(self, out: Tensor, frames: int, grid: Grid) -> Tensor:
        """(B, N, pt * p * p * C) -> (B, C, F * pt, h * p, w * p); each token's channels are ordered (pt, p, p, C)."""
        cfg = self.config
        (h, w), p, pt, c = grid, cfg.patch_size, cfg.patch_frames, cfg.out_channels
        out = out.reshape(out.shape[0], frames, h, w, pt, p, p, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(out.shape[0], c, frames * pt, h * p, w * p)

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor,
                encoder_hidden_states_image: Tensor | None = None) -> Tensor:
        """x: (B, C_in, F, H, W), t: (B,) in [0, 1000], encoder_hidden_states: (B, L, 4096),
        encoder_hidden_states_image: (B, 257, 1280) or None -> (B, C_out, F, H, W)."""
        inp = self.embed(x, t, encoder_hidden_states, encoder_hidden_states_image)
        rope = self.rope(inp.frames, inp.grid, x.device)  # 2 x (N, Dh/2)
        h = inp.tokens
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, inp.context, inp.image_tokens, inp.e, rope, use_reentrant=False)
            else:
                h = block(h, inp.context, inp.image_tokens, inp.e, rope)  # (B, N, D)
        return self.unpatchify(self.head(h, inp.temb), inp.frames, inp.grid)  # (B, C_out, F, H, W)
