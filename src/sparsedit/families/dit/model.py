"""Class-conditional DiT (Peebles & Xie, 2023) with adaLN-Zero conditioning.

The model knows nothing about diffusion: ``forward(x, t, y)`` maps a noisy latent, timesteps and
labels to the network output. Module names follow the official release
(https://github.com/facebookresearch/DiT/blob/main/models.py) so its state dicts load name for name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sparsedit.core.layers import (
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    init_linears_and_patch_embed,
    sincos_pos_embed_2d,
    unpatchify,
)
from sparsedit.errors import SparseditError

# name -> (depth, hidden_size, num_heads); the patch size is the "/p" suffix.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "DiT-XL": (28, 1152, 16),
    "DiT-L": (24, 1024, 16),
    "DiT-B": (12, 768, 12),
    "DiT-S": (12, 384, 6),
}
DIT_PRESETS = tuple(f"{size}/{p}" for size in DIT_SIZES for p in (2, 4, 8))

# Classifier-free guidance: the official DiT guides only the first 3 latent channels ("for
# reproducibility", see its sample.py); "all" guides every epsilon channel.
CFG_MODES = ("first3", "all")


class GridConfig:
    """Input-size helpers shared by the DiT, PixArt and Latte configs (plain mixin, adds no fields).

    Needs the fields ``input_size``, ``patch_size``, ``in_channels``, ``learn_sigma`` and ``data_space``.
    """

    input_size: int | tuple[int, int]
    patch_size: int
    in_channels: int
    learn_sigma: bool
    data_space: str

    def check_input(self, hint: str = "") -> None:
        """JSON's list -> tuple for ``input_size``; data space and patch divisibility checks."""
        if isinstance(self.input_size, list):
            self.input_size = tuple(self.input_size)
        if self.data_space not in ("latent", "pixel"):
            raise SparseditError(f"data_space must be 'latent' or 'pixel', not {self.data_space!r}")
        h, w = self.latent_hw
        if h % self.patch_size or w % self.patch_size:
            raise SparseditError(f"input size {h}x{w} is not divisible by patch size {self.patch_size}{hint}")

    @property
    def latent_hw(self) -> tuple[int, int]:
        s = self.input_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.latent_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]  # subclasses are dataclasses
        if isinstance(self.input_size, tuple):
            d["input_size"] = list(self.input_size)
        return d


@dataclass
class DiTConfig(GridConfig):
    """Everything needed to rebuild a DiT; saved as ``config.json`` beside the weights.

    Numerical differences between checkpoint writers are named fields, not silent:
    ``t_freq_shift`` (0 official, 1 diffusers), ``norm_eps`` (attention and final norm) and
    ``mlp_norm_eps`` (official 1e-6, diffusers' ``norm_eps`` = 1e-5).
    """

    input_size: int | tuple[int, int] = 32  # latent (or pixel) size, H or (H, W)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    t_freq_shift: float = 0.0
    norm_eps: float = 1e-6
    mlp_norm_eps: float = 1e-6
    # diffusers' DiTTransformer2DModel keeps a separate timestep/label embedder in every block; a
    # converted release has identical copies (loaded as one shared embedder) but a model trained in
    # diffusers may not. True = one embedder per block, block 0's also conditions the final layer.
    per_block_cond: bool = False
    # What the model denoises: "latent" (SD-VAE latents scaled by 0.18215, decoded with --vae) or
    # "pixel" (images in [-1, 1], e.g. the embedded digits model). Saved so sampling needs no flag.
    data_space: str = "latent"
    model_type: str = field(default="DiT", init=False)

    def __post_init__(self) -> None:
        self.check_input("; pick an image size whose latent is a multiple of the patch size")
        if self.hidden_size % self.num_heads:
            raise SparseditError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


def dit_config(preset: str, image_size: int = 256, vae_downsample: int = 8, **overrides: Any) -> DiTConfig:
    """Config for a preset such as ``"DiT-XL/2"`` at ``image_size`` pixels (latent = image / 8)."""
    size, _, patch = preset.partition("/")
    if size not in DIT_SIZES or patch not in ("2", "4", "8"):
        raise SparseditError(f"unknown DiT preset {preset!r}; choose one of {', '.join(DIT_PRESETS)}")
    if image_size % vae_downsample:
        raise SparseditError(f"image size {image_size} is not divisible by the VAE factor {vae_downsample}")
    depth, hidden, heads = DIT_SIZES[size]
    kwargs: dict[str, Any] = dict(
        input_size=image_size // vae_downsample, patch_size=int(patch), hidden_size=hidden, depth=depth,
        num_heads=heads,
    )
    kwargs.update(overrides)
    return DiTConfig(**kwargs)


class ClassCondEmbedder(nn.Module):
    """c = t_embedder(t) + y_embedder(y): the conditioning vector of a class-conditional DiT."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.t_embedder = TimestepEmbedder(config.hidden_size, freq_shift=config.t_freq_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.t_embedder(t) + self.y_embedder(y)  # (B, D)


class GuidanceMixin:
    """``forward_with_cfg`` for any model whose ``forward(x, t, y, **kw)`` predicts [eps, rest]."""

    config: Any

    def forward_with_cfg(
        self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float, cfg_mode: str = "first3", **kwargs: Any
    ) -> Tensor:
        """Classifier-free guidance on a doubled batch: first half conditional, second half null labels.

        The first half of ``x`` is used for both halves (so the two halves share noise), the guided
        epsilon is written to both halves; learned-variance channels are passed through unguided.
        ``cfg_mode``: "first3" (official DiT) or "all" (every epsilon channel).
        """
        if cfg_mode not in CFG_MODES:
            raise SparseditError(f"unknown cfg mode {cfg_mode!r}; choose one of {', '.join(CFG_MODES)}")
        half = x[: len(x) // 2]
        out = self(torch.cat([half, half]), t, y, **kwargs)  # type: ignore[operator]
        n_guided = 3 if cfg_mode == "first3" else self.config.in_channels
        eps, rest = out[:, :n_guided], out[:, n_guided:]
        cond, uncond = eps.chunk(2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


class DiT(GuidanceMixin, nn.Module):
    """Diffusion Transformer: patchify -> N x DiTBlock (adaLN-Zero) -> final layer -> unpatchify.

    ``init_gain`` is the xavier gain of the from-scratch initialisation's linears (:meth:`initialize_weights`).
    """

    def __init__(self, config: DiTConfig, init_gain: float = 1.0):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # trade compute for memory in training (see run_block)
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, d)
        self.t_embedder = TimestepEmbedder(d, freq_shift=config.t_freq_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
        self.blocks = self.build_blocks(config)
        # Blocks 1.. get their own embedder only in diffusers' per-block layout (see DiTConfig).
        self.block_cond = nn.ModuleList(
            ClassCondEmbedder(config) for _ in range(config.depth - 1 if config.per_block_cond else 0)
        )
        self.final_layer = FinalLayer(d, config.patch_size, config.out_channels, config.norm_eps)
        # Fixed sin-cos table, recomputed from the config rather than stored (non-persistent).
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, *config.grid)[None], persistent=False)
        self.initialize_weights(init_gain)

    def build_blocks(self, config: DiTConfig) -> nn.ModuleList:
        """One :class:`DiTBlock` per layer (SparseDiT overrides this with its own layout)."""
        return nn.ModuleList(
            DiTBlock(config.hidden_size, config.num_heads, config.mlp_ratio, config.norm_eps, config.mlp_norm_eps)
            for _ in range(config.depth)
        )

    def initialize_weights(self, gain: float = 1.0) -> None:
        """DiT's initialisation: xavier linears, zeroed adaLN and output ("adaLN-Zero").

        ``gain`` scales the linears' xavier bound: 1 is DiT's, 0.5 the SparseDiT authors' ``train.py``
        (the layers zeroed or re-drawn below are unaffected). Every gain draws the same random numbers.
        """
        if not gain > 0:
            raise SparseditError(f"the initialisation gain must be > 0, got {gain}; DiT uses 1, the SparseDiT authors 0.5")
        init_linears_and_patch_embed(self, self.x_embedder, gain)
        for emb in [self, *self.block_cond]:
            nn.init.normal_(emb.y_embedder.embedding_table.weight, std=0.02)
            nn.init.normal_(emb.t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for m in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def token_grid(self, x: Tensor) -> tuple[int, int]:
        p = self.config.patch_size
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[-2] % p or x.shape[-1] % p:
            raise SparseditError(
                f"input of shape {tuple(x.shape)} does not fit this model: expected (B, "
                f"{self.config.in_channels}, H, W) with H and W multiples of {p}"
            )
        return x.shape[-2] // p, x.shape[-1] // p

    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """(1, H*W, D) table; another grid than the config's is computed on the fly."""
        if grid == self.config.grid:
            return self.pos_embed
        return sincos_pos_embed_2d(self.config.hidden_size, *grid)[None].to(self.pos_embed)

    def conditions(self, t: Tensor, y: Tensor) -> list[Tensor]:
        """Per-block conditioning vectors (B, D): one shared vector unless ``per_block_cond``."""
        c = self.t_embedder(t) + self.y_embedder(y)
        return [c, *(emb(t, y) for emb in self.block_cond)] if self.block_cond else [c] * len(self.blocks)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x: (B, C, H, W) latents, t: (B,) timesteps, y: (B,) labels -> (B, C_out, H, W)."""
        grid = self.token_grid(x)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        h = self.x_embedder(x) + self.position_embedding(grid)  # (B, N, D)
        cs = self.conditions(t, y)
        for block, c in zip(self.blocks, cs, strict=True):
            h = self.run_block(block, h, c)  # (B, N, D)
        return self.head(h, cs[0], grid)

    def run_block(self, block: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        """Call ``block``, recomputing its activations in backward when gradient checkpointing is on."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def block_tokens(self, layer: int, output: Tensor, batch: int) -> Tensor:
        """Block ``layer``'s output as (B, tokens, D); a DiT's hidden states already are."""
        return output

    def head(self, h: Tensor, c: Tensor, grid: tuple[int, int]) -> Tensor:
        """Final adaLN layer and unpatchify: (B, N, D) -> (B, C_out, H, W)."""
        h = self.final_layer(h, c)  # (B, N, p*p*C_out)
        return unpatchify(h, grid, self.config.patch_size, self.config.out_channels)


