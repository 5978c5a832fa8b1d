"""FLUX as diffusers' ``FluxTransformer2DModel`` (for :func:`sparsedit.interop.use_in_pipeline`).

FluxPipeline packs the (B, 16, H, W) latent into (B, H/2 * W/2, 64) tokens, passes sigma in [0, 1] as the timestep
and builds the RoPE positions (``img_ids`` (N, 3): (0, row, col); ``txt_ids`` (L, 3): zeros). The face reads the
token grid off ``img_ids``, unpacks the tokens to our (B, C, H, W) latent, calls the model with ``sigma * 1000``
and packs its output again: the same numbers as diffusers' transformer. A SparseFLUX (a ``Flux`` subclass) goes
through the same face: it picks each step's sparse grid from the ``sigma * 1000`` it receives, as its schedule says.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.errors import SparseditError
from sparsedit.families.face import DiffusersFace
from sparsedit.families.flux.convert import diffusers_flux_fields
from sparsedit.families.flux.model import Flux, pack_latents, position_ids, unpack_latents

Grid = tuple[int, int]


class DiffusersFlux(DiffusersFace):
    """A sparsedit FLUX behind diffusers' ``FluxTransformer2DModel`` call signature.

    Any image size works (the grid comes from ``img_ids`` on every call), so unlike the other faces a FLUX whose
    config is not square is accepted.
    """

    family = Flux
    pipelines = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    checked_keys = ("in_channels", "out_channels", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds")

    def __init__(self, model: nn.Module):
        nn.Module.__init__(self)  # not DiffusersFace.__init__: it refuses non-square configs, which FLUX need not
        if not isinstance(model, self.family):
            raise SparseditError(f"{type(self).__name__} wraps a FLUX, not {type(model).__name__}")
        cfg = model.config
        if cfg.patch_size != 2:
            raise SparseditError(f"FluxPipeline packs 2x2 latent patches; this FLUX has patch_size {cfg.patch_size}")
        self.model = model
        self.config = SimpleNamespace(**diffusers_flux_fields(cfg))

    @contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """FluxPipeline wraps each call in ``transformer.cache_context(...)`` (diffusers' step caches): no cache here."""
        yield

    def token_grid(self, img_ids: Tensor | None, tokens: int) -> Grid:
        """The (h, w) token grid of FluxPipeline's ``img_ids``; they must be its plain (0, row, col) grid."""
        if img_ids is None:
            raise SparseditError("FLUX needs img_ids (N, 3) to know the token grid; pass them as FluxPipeline does")
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids  # diffusers still accepts the older (B, N, 3)
        if ids.shape != (tokens, 3):
            raise SparseditError(f"img_ids of shape {tuple(img_ids.shape)} for {tokens} image tokens: expected ({tokens}, 3)")
        h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        if h * w != tokens or not torch.equal(ids.float(), position_ids((h, w), 0, ids.device)):
            raise SparseditError("img_ids are not FluxPipeline's (0, row, col) grid (reference-image or Kontext ids?); "
                                 "sparsedit's FLUX builds its positions from the grid and supports only that")
        return h, w

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                pooled_projections: Tensor | None = None, timestep: Tensor | float | None = None,
                img_ids: Tensor | None = None, txt_ids: Tensor | None = None, guidance: Tensor | None = None,
                joint_attention_kwargs: dict[str, Any] | None = None, controlnet_block_samples: Any = None,
                controlnet_single_block_samples: Any = None, return_dict: bool = True,
                controlnet_blocks_repeat: bool = False) -> Any:
        """(B, N, 64) packed latents, (B, L, 4096) T5 and (B, 768) CLIP embeddings, sigma in [0, 1], ids, guidance
        -> ``.sample`` (B, N, 64)."""
        if encoder_hidden_states is None or pooled_projections is None:
            raise SparseditError("a FLUX needs encoder_hidden_states (T5) and pooled_projections (CLIP) of the prompt")
        # FluxPipeline passes {} when the user gives none; anything in it (LoRA scale, IP-Adapter) would be dropped.
        if joint_attention_kwargs:
            raise SparseditError(f"sparsedit's FLUX supports no joint_attention_kwargs, got {sorted(joint_attention_kwargs)}")
        if controlnet_block_samples is not None or controlnet_single_block_samples is not None:
            raise SparseditError("sparsedit's FLUX takes no ControlNet residuals; use diffusers' transformer")
        if txt_ids is not None and bool(txt_ids.any()):
            raise SparseditError("txt_ids are not all zero; sparsedit's FLUX places text tokens at (0, 0, 0) as "
                                 "FluxPipeline does")
        b, n, _ = hidden_states.shape
        grid = self.token_grid(img_ids, n)
        p = self.model.config.patch_size
        # As diffusers: sigma is rounded to the model's dtype before it is scaled to [0, 1000].
        t = self.batch_timesteps(timestep, b, hidden_states.device).to(self.dtype) * 1000
        x = unpack_latents(hidden_states, grid, p)  # (B, C, H, W)
        out = self.model(x, t, encoder_hidden_states, pooled_projections, guidance)  # (B, C, H, W)
        return self.pack(pack_latents(out, p), return_dict)  # (B, N, C * p * p)
