"""The Wan family adapter: the dense Wan 2.1 / 2.2 video transformer and SparseWan behind the
:class:`~sparsedit.families.base.Family` interface (presets, sparsify, formats, flow-matching timesteps, prompts
through WanPipeline, Euler sampling with guidance, one evaluation with explicit sparse tokens as bench and flops run
it). A SparseWan's token sets are ``((h, w), frames)``, as SparseLatte's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsedit.errors import SparseditError
from sparsedit.families import register
from sparsedit.families.base import Tokens, refuse_drop_null_caption
from sparsedit.families.flow import FlowFamily
from sparsedit.families.wan.model import (
    WAN_IMAGE_TOKENS,
    WAN_PRESETS,
    WAN_VAE_STRIDE,
    Wan,
    WanConfig,
    wan_config,
    wan_pixel_size,
)
from sparsedit.families.wan.sparse import SPARSE_WAN_LAYOUTS, SparseWan, SparseWanConfig, sparse_wan_preset

WAN_STEPS = 50  # WanPipeline's num_inference_steps
WAN_CFG = 5.0  # WanPipeline's guidance_scale
# The flow shift the Wan team gives per resolution (WanPipeline's docstring: 3.0 for 480p, 5.0 for 720p).
SHIFT_480P, SHIFT_720P = 3.0, 5.0
_480P_LATENT_AREA = (480 // 8) * (832 // 8)


WAN_VAE_HELP = ("pass the vae/ folder of the model's diffusers pipeline (an AutoencoderKLWan), e.g. from "
                "`huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir Wan2.1-T2V-1.3B`, or --pipeline")


@register
class WanFamily(FlowFamily):
    """Wan 2.1 / 2.2 (https://github.com/Wan-Video/Wan2.1): text- and image-to-video flow-matching transformers on
    (B, C, F, H, W) latents of the Wan VAE."""

    name = "wan"
    dense_type = "Wan"
    sparse_type = "SparseWan"
    presets = tuple(WAN_PRESETS)
    preset_help = ", ".join([*WAN_PRESETS, *(f"Sparse{name}" for name in SPARSE_WAN_LAYOUTS)])
    diffusers_format = "wan-diffusers"
    sample_suffixes = (".png", ".gif", ".mp4")
    video_fps = 16  # Wan videos play at 16 frames per second
    default_sampling = ("euler", WAN_STEPS)
    default_cfg_scale = WAN_CFG
    pipeline_class = "WanPipeline"
    pooled_text = False  # umT5 embeddings only, no pooled vector

    @classmethod
    def model_types(cls) -> dict[str, tuple[type, type[nn.Module]]]:
        return {"Wan": (WanConfig, Wan), "SparseWan": (SparseWanConfig, SparseWan)}

    @classmethod
    def resolve_preset(cls, name: str, image_size: int) -> tuple[Any, str | None] | None:
        """``Wan2.1-T2V-1.3B`` -> (its config at ``image_size``: 480 -> 480 x 832 px, 81 frames, None);
        ``SparseWan2.1-T2V-1.3B`` -> (the same config, its default layout)."""
        if name in WAN_PRESETS:
            return wan_config(name, image_size), None
        sparse = sparse_wan_preset(name)
        return None if sparse is None else (wan_config(sparse[0], image_size), sparse[1])

    # ---- sparsify ---------------------------------------------------------------------------------

    def check_rates(self, rates: dict[str, Any]) -> None:
        if rates.get("num_pieces") is not None:
            raise SparseditError("--num-pieces does not apply to Wan: a SparseWan's token set follows r(t) at every "
                                 "timestep (training draws runs of one token set); drop it")

    def sparse_config(self, layout: str, **rates: Any) -> Any:
        self.check_rates(rates)
        rates.pop("num_pieces", None)
        return SparseWanConfig.from_wan(self.config, layout, **rates)

    def sparsify(self, model: nn.Module, layout: str | None, num_pieces: int | None, **options: Any) -> nn.Module:
        """The SparseWan of a dense Wan. ``recovery_pos_embed`` is dropped: `sparsedit sparsify` always passes the
        paper's default (True), and Wan has no position table for it to re-add (its config fixes it to False)."""
        self.refuse_sparse_source()
        from sparsedit.families.wan.sparse import sparsify_wan

        self.check_rates({"num_pieces": num_pieces})
        options.pop("recovery_pos_embed", None)
        return sparsify_wan(model, layout, **options)  # type: ignore[arg-type]

    def init_rules(self, model: nn.Module) -> list[Any]:
        """The tensor-by-tensor initialisation map of a SparseWan (``sparsedit sparsify --verbose``)."""
        from sparsedit.families.wan.sparse import wan_init_rules

        return wan_init_rules(model.config, list(model.state_dict()))  # type: ignore[arg-type]

    def token_sets(self) -> list[Tokens]:
        """The distinct ((h, w), frames) a full run can use, fewest tokens first (r(t) at every integer step)."""
        sets = {self.config.tokens_at(t) for t in range(self.config.num_timesteps)}
        return sorted(sets, key=lambda s: (s[0][0] * s[0][1] * s[1], s))

    def tokens_at(self, t: float) -> Tokens:
        """The token set at model timestep ``t`` (``sigma * 1000``, mapped to its integer step as the model maps it)."""
        if not self.sparse:
            return None
        from sparsedit.families.wan.sparse import schedule_step

        return self.config.tokens_at(schedule_step(self.config, t))

    def timestep_sampler(self, generator: torch.Generator) -> Any:
        """SparseLatte's video piece sampler (one run of timesteps with one token set per batch, t uniform), over the
        config's ``train_timesteps`` (a Wan2.2-A14B expert's steps) when set."""
        from sparsedit.families.wan.sparse import WanPieceSampler

        return WanPieceSampler(self.config, generator) if self.sparse else None

    # ---- checkpoint formats ----------------------------------------------------------------------------

    @classmethod
    def reads_diffusers(cls, cfg: dict[str, Any]) -> bool:
        from sparsedit.families.wan.convert import is_wan_diffusers_config

        return is_wan_diffusers_config(cfg)

    @classmethod
    def from_diffusers(cls, path: Path) -> nn.Module:
        from sparsedit.families.wan.convert import wan_from_diffusers

        return wan_from_diffusers(path)

    @classmethod
    def reads_file(cls, obj: Any) -> bool:
        from sparsedit.families.wan.convert import is_wan_original_state

        return is_wan_original_state(obj)  # the Wan team's files: patch_embedding, blocks.i.self_attn.q, head

    @classmethod
    def from_file(cls, obj: Any, path: Path, preset: str | None, image_size: int | None, use_ema: bool,
                  semantic_size: int | tuple[int, int] | None = None) -> nn.Module:
        from sparsedit.families.dit.family import refuse_semantic_size
        from sparsedit.families.wan.convert import wan_from_original_state

        refuse_semantic_size(semantic_size, path)
        model = wan_from_original_state(obj, str(path))
        if image_size is not None:
            cls(model.config).set_image_size(model, image_size)
        return model

    def save_diffusers(self, model: nn.Module, out: str | Path, overwrite: bool, drop_null_caption: bool) -> Path:
        from sparsedit.families.wan.convert import save_wan_diffusers

        refuse_drop_null_caption(model, drop_null_caption)
        if self.sparse:
            raise SparseditError("a SparseWan has no diffusers format (WanTransformer3DModel has no sparse blocks); "
                                 "save it in sparsedit's format and run it with sparsedit.interop.use_in_pipeline")
        return save_wan_diffusers(model, out, overwrite)  # type: ignore[arg-type]

    def export_differences(self) -> list[str]:
        return []  # the same tensors under diffusers' names

    @classmethod
    def config_from_diffusers(cls, cfg: dict[str, Any], name: str) -> Any:
        from sparsedit.families.wan.convert import wan_config_from_diffusers

        return wan_config_from_diffusers(cfg, name)

    # ---- conditioning and sampling -----------------------------------------------------------------------

    @property
    def frames(self) -> int | None:
        """Latent frames of a sample (21 for an 81-frame video: the VAE packs 4 frames after the first into one)."""
        return self.config.num_frames

    def config_at_size(self, image_size: int) -> Any:
        """480 -> 480 x 832 px and 720 -> 720 x 1280 (the pipelines' sizes), any other size a square."""
        import dataclasses

        h, w = wan_pixel_size(image_size)
        s = WAN_VAE_STRIDE[1] * self.config.patch_size
        if h % s or w % s:
            raise SparseditError(f"--image-size {image_size} ({h}x{w} px) is not a multiple of {s} (the VAE's 8x times "
                                 f"the {self.config.patch_size}x{self.config.patch_size} patches)")
        return dataclasses.replace(self.config, input_size=(h // WAN_VAE_STRIDE[1], w // WAN_VAE_STRIDE[1]))

    def latent_scaling(self, vae: nn.Module) -> tuple[float, float]:
        raise SparseditError("Wan latents are normalised per channel (the VAE's latents_mean / latents_std), not by one "
                             "scale: decode them with family_of(model).decode_samples(model, latents, vae)")

    def load_vae(self, path: str | Path | None, device: torch.device | str) -> nn.Module:
        """The Wan VAE (``AutoencoderKLWan``, a causal 3-D VAE: 4x in time, 8x in space), e.g. a pipeline's ``vae/``."""
        from sparsedit.encoders.vae import load_vae

        return load_vae(path, device, latent_channels=self.config.out_channels, vae_class="AutoencoderKLWan",
                        help_text=WAN_VAE_HELP)

    def decode_samples(self, model: nn.Module, samples: Tensor, vae: nn.Module | None) -> Tensor:
        """(B, C, F, H, W) latents -> (B, 3, 1 + 4 (F - 1), 8H, 8W) videos in [-1, 1], as WanPipeline decodes them: the
        whole clip at once (the VAE is causal in time), after undoing the per-channel normalisation
        ``(z - latents_mean) / latents_std``."""
        if vae is None:
            raise SparseditError(f"Wan latents need the Wan VAE to decode: {WAN_VAE_HELP}")
        cfg = vae.config
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1).to(samples.device)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1).to(samples.device)
        dtype = next(vae.parameters()).dtype
        with torch.no_grad():
            videos = [vae.decode((z[None].float() * std + mean).to(dtype)).sample.float() for z in samples]
        return torch.cat(videos).clamp(-1, 1)

    def pipeline_encode(self, pipe: Any, prompts: list[str], negative: str | None, guided: bool,
                        device: torch.device) -> dict[str, Tensor]:
        # diffusers' default negative prompt is "" (the Wan team's scripts use a long Chinese one: pass it as negative)
        embeds, null = pipe.encode_prompt(prompt=prompts, negative_prompt=negative, do_classifier_free_guidance=guided,
                                          device=device, max_sequence_length=self.config.max_sequence_length)
        return {"embeds": embeds, "null_embeds": null} if guided else {"embeds": embeds}

    def refuse_image_to_video(self, what: str) -> None:
        cfg = self.config
        if cfg.image_conditioned or cfg.in_channels != cfg.out_channels:
            raise SparseditError(f"{what} is for text-to-video Wans; this one is image-to-video ({cfg.in_channels} input "
                                 "channels with the image condition): run it in WanImageToVideoPipeline through "
                                 "sparsedit.interop.use_in_pipeline")

    def generate(self, model: nn.Module, labels: Sequence[int] | None = None, text: dict[str, Tensor | None] | None = None,
                 *, steps: int | None = None, cfg_scale: float = WAN_CFG, seed: int = 0,
                 device: str | torch.device = "cpu", noise: Tensor | None = None, progress: bool = False,
                 **unused: Any) -> Tensor:
        """Latents (B, C, F, H, W) of a text-to-video run as WanPipeline samples them with a FlowMatchEulerDiscrete
        scheduler of the resolution's shift: Euler steps, guidance ``u + cfg_scale * (c - u)`` with two calls against
        ``null_embeds`` (zeros when absent). ``text``: ``embeds`` (B, L, 4096); ``noise`` or a draw from ``seed``."""
        from sparsedit.diffusion.flow import euler_sample, start_noise

        self.refuse_image_to_video("sparsedit's sampling")
        embeds = (text or {}).get("embeds")
        if embeds is None:
            raise SparseditError("a Wan samples from caption embeddings: pass text={'embeds': (B, L, 4096)} (the "
                                 "pipeline's prompt_embeds) and 'null_embeds' (its negative_prompt_embeds) for guidance")
        null = (text or {}).get("null_embeds")
        uncond = torch.zeros_like(embeds) if null is None else null
        if noise is None:
            noise = start_noise(self.sample_shape(embeds.shape[0]), seed, device)

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            c = model(x, t, embeds)
            if cfg_scale == 1.0:
                return c
            u = model(x, t, uncond)  # a second call, as WanPipeline (not a doubled batch)
            return u + cfg_scale * (c - u)

        sigmas = self.run_sigmas(steps or self.default_sampling[1], tuple(noise.shape[-2:]))  # type: ignore[arg-type]
        return euler_sample(velocity, noise, sigmas, self.progress_bar(progress))

    def run_sigmas(self, steps: int, latent_hw: tuple[int, int] | None = None) -> Tensor:
        """FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps): shift 3.0 up to 480p's area (480 x 832 px),
        5.0 above it (720p), as the Wan team sets them."""
        from sparsedit.diffusion.flow import euler_sigmas

        h, w = self.config.latent_hw if latent_hw is None else latent_hw
        return euler_sigmas(steps, shift=SHIFT_480P if h * w <= _480P_LATENT_AREA else SHIFT_720P)

    def training_kwargs(self, cond: dict[str, Any], caption: Tensor, device: torch.device) -> dict[str, Any]:
        """The umT5 caption (no mask, no pooled vector: the pipelines zero the padding and attend to all of it)."""
        self.refuse_image_to_video("training")
        return {"encoder_hidden_states": caption}

    def diffusers_face(self, model: nn.Module) -> nn.Module:
        """``WanTransformer3DModel``'s call signature; the face passes each step's timestep (``sigma * 1000``) as it
        is, so a SparseWan runs every WanPipeline step at that step's token set."""
        from sparsedit.families.wan.face import DiffusersWan

        return DiffusersWan(model)

    # ---- one model evaluation, as bench and flops run it -----------------------------------------------

    def check_guidance(self, name: str) -> None:
        pass  # a caption model always has an unconditional input (the negative prompt)

    def sample_shape(self, rows: int) -> tuple[int, ...]:
        c = self.config
        return (rows, c.in_channels, c.num_frames, *c.latent_hw)

    def conditioning(self, model: nn.Module, batch: int, guided: bool, gen: torch.Generator) -> dict[str, Tensor]:
        """Random umT5 embeddings of ``max_sequence_length`` tokens (and CLIP image tokens for I2V); under guidance the
        second half's caption is zeros, standing in for the negative prompt (costs do not depend on values)."""
        cfg = self.config
        text = torch.randn(batch, cfg.max_sequence_length, cfg.caption_channels, generator=gen)
        cond = {"encoder_hidden_states": torch.cat([text, torch.zeros_like(text)]) if guided else text}
        if cfg.image_conditioned:
            pairs = 2 if cfg.pos_embed_seq_len else 1  # FLF2V: a first and a last frame per sample
            per = cfg.pos_embed_seq_len // 2 if cfg.pos_embed_seq_len else WAN_IMAGE_TOKENS
            image = torch.randn(batch * pairs, per, cfg.image_dim, generator=gen)
            cond["encoder_hidden_states_image"] = torch.cat([image, image]) if guided else image
        return cond

    def call(self, fn: Callable[..., Tensor], x: Tensor, t: Tensor, cond: dict[str, Tensor], tokens: Tokens) -> Tensor:
        args = (x, t, cond["encoder_hidden_states"], cond.get("encoder_hidden_states_image"))
        if tokens is None:
            return fn(*args)
        if not self.sparse:
            raise SparseditError(f"a dense Wan runs on its whole token grid; got sparse tokens {tokens}")
        return fn(*args, grid=tokens[0], frames=tokens[1])

    def describe(self, tokens: Tokens) -> dict[str, Any]:
        grid, frames = (self.config.grid, self.config.num_frames) if tokens is None else tokens
        return {"forward_grid": list(grid), "forward_frames": frames}

    def reset_buffers(self, model: nn.Module) -> None:
        pass  # no buffers: the RoPE tables are computed from the token grid on every forward

    # ---- cost counting ------------------------------------------------------------------------------------

    cost_final_modules = ("head",)
    cost_token_inputs = ("encoder_hidden_states", "encoder_hidden_states_image")
    # temporal_share splits a rate into time and space; train_timesteps only restricts training draws
    cost_schedule_fields = (*FlowFamily.cost_schedule_fields, "temporal_share", "train_timesteps")

    def cost_conditioning(self, model: nn.Module, text_len: int | None) -> dict[str, Tensor]:
        """One sample's conditioning with ``max_sequence_length`` caption tokens. ``text_len`` is not read: the Wan
        pipelines always pad to 512 tokens (and I2V attention splits the context there), so the caption length is
        the config's; the video MAC functions pass PixArt's 120 as their default."""
        return self.conditioning(model, 1, False, torch.Generator())

    def cost_size_fields(self, frames: int | None) -> dict[str, Any]:
        return {} if frames is None else {"num_frames": frames}

    def split_tokens(self, tokens: Tokens) -> tuple[Any, int | None]:
        return (None, None) if tokens is None else (tokens[0], tokens[1])

    # ---- users' LoRAs (sparsedit.lora) ------------------------------------------------------------------------------

    def diffusers_key_map(self) -> dict[str, list[tuple[str, int, int | None]]]:
        """Every tensor of the dense Wan -> the one ``WanTransformer3DModel`` tensor it is (the converter's names)."""
        from sparsedit.families.wan.convert import _model_keys, diffusers_key

        return {k: [(diffusers_key(k), 0, None)] for k in _model_keys(self.dense_config())}

