"""What the flow-matching families (SD3, FLUX) share: Euler sampling runs on t = sigma * 1000, the rectified-flow
training process, and the pooled text vector beside the caption in every training forward."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sparsedit.errors import SparseditError
from sparsedit.families.base import Family


class FlowFamily(Family):
    """A :class:`Family` of flow-matching text-to-image models; subclasses give their pipelines' sigmas."""

    samplers: ClassVar[tuple[str, ...]] = ("euler",)  # flow matching: t = sigma * 1000
    default_cfg_scale: ClassVar[float] = 1.0
    prompt_flag = "--pipeline"  # the prompts are encoded by the pipeline's own CLIP / T5 encoders
    pooled_text = True
    any_size = True  # SD3, FLUX.1 and Wan take any latent size (position tables cropped, RoPE computed)
    min_snr = False  # Min-SNR weighting is for DDPM models: `sparsedit train`'s default recipe is "paper"
    pipeline_class: ClassVar[str]  # the diffusers pipeline the model runs in ("FluxPipeline")

    @property
    def text_conditioned(self) -> bool:
        return True

    def run_sigmas(self, steps: int) -> Tensor:
        """The ``steps + 1`` sigmas (ending at 0) of the family's pipeline run at this config's resolution."""
        raise NotImplementedError

    def sampling_timesteps(self, sampler: str, steps: int) -> list[float]:
        """The model timesteps ``sigma * 1000`` of a ``steps``-step Euler run (the final sigma 0 is no model call), in
        increasing order."""
        from sparsedit.diffusion.flow import T_SCALE

        if sampler not in self.samplers:
            raise SparseditError(f"a {self.dense_type} is a flow-matching model: it samples with euler (sigmas x 1000), "
                                 f"not {sampler}; use --sampler euler")
        return sorted(float(s) * T_SCALE for s in self.run_sigmas(steps)[:-1])

    @staticmethod
    def progress_bar(progress: bool) -> Any:
        """The ``progress`` wrapper of :func:`sparsedit.diffusion.flow.euler_sample`: a tqdm bar over the steps."""
        if not progress:
            return None
        from tqdm.auto import tqdm

        return lambda steps: tqdm(steps, desc="sampling", unit="step", dynamic_ncols=True, leave=False)

    def teacher_sampling(self) -> dict[str, Any]:
        """Data-free distillation samples the teacher as its pipeline does by default (steps, guidance)."""
        return {"sampler": "euler", "steps": self.default_sampling[1], "cfg_scale": self.default_cfg_scale,
                "batch_size": 4}

    def latent_scaling(self, vae: nn.Module) -> tuple[float, float]:
        """The VAE's own ``scaling_factor`` and ``shift_factor`` (SD3: 1.5305, 0.0609; FLUX.1: 0.3611, 0.1159), as the
        pipelines apply them."""
        cfg = vae.config
        return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)

    def config_at_size(self, image_size: int) -> Any:
        from sparsedit.encoders.vae import VAE_DOWNSAMPLE

        if image_size % (VAE_DOWNSAMPLE * self.config.patch_size):
            raise SparseditError(f"--image-size {image_size} is not a multiple of {VAE_DOWNSAMPLE * self.config.patch_size} "
                                 f"(the VAE's 8x times the {self.config.patch_size}x{self.config.patch_size} patches)")
        return super().config_at_size(image_size)

    def set_image_size(self, model: nn.Module, image_size: int) -> None:
        model.config = self.config_at_size(image_size)  # the model runs at any size: only its default changes
        self.config = model.config

    def default_vae_dir(self, encoder_path: str | Path | None) -> Path | None:
        """The ``vae/`` folder of the pipeline folder that encodes the prompts."""
        from sparsedit.encoders.pipeline import pipeline_vae_dir

        return None if encoder_path is None else pipeline_vae_dir(encoder_path, self.pipeline_class)

    def encode_prompts(self, model: nn.Module | None, encoder_path: str | Path, prompts: Sequence[str],
                       negative: str | None, guided: bool, device: torch.device | str) -> dict[str, Tensor]:
        """Prompts -> the ``text`` dict of :meth:`generate`, by the ``encode_prompt`` of the pipeline folder
        ``encoder_path`` (its CLIP / T5 / umT5 encoders, exactly as the pipeline encodes them)."""
        from sparsedit.encoders.pipeline import load_text_pipeline

        if isinstance(prompts, str) or not prompts:
            raise SparseditError("pass a non-empty list of prompts")
        pipe = load_text_pipeline(encoder_path, self.pipeline_class, device)
        with torch.no_grad():
            text = self.pipeline_encode(pipe, list(prompts), negative, guided, torch.device(device))
        cfg = self.config
        got = (text["embeds"].shape[-1], text["pooled"].shape[-1] if self.pooled_text else None)
        want = (cfg.caption_channels, cfg.pooled_channels if self.pooled_text else None)
        if got != want:
            pooled = f" and {got[1]}-wide pooled vectors" if self.pooled_text else ""
            takes = f"{want[0]} and {want[1]}" if self.pooled_text else f"{want[0]}"
            raise SparseditError(f"the encoders in {encoder_path} give {got[0]}-wide captions{pooled}, the model takes "
                                 f"{takes}; pass the pipeline folder of the model it was made from")
        return {k: v.float() for k, v in text.items()}

    @classmethod
    def config_from_diffusers(cls, cfg: dict[str, Any], name: str) -> Any:
        """The dense config of a diffusers transformer ``config.json`` (already parsed)."""
        raise NotImplementedError

    def pipeline_encode(self, pipe: Any, prompts: list[str], negative: str | None, guided: bool,
                        device: torch.device) -> dict[str, Tensor]:
        """The family's call of its pipeline's ``encode_prompt``."""
        raise NotImplementedError

    def training_process(self) -> Any:
        from sparsedit.diffusion.flow import FlowProcess

        # Rectified flow with SD3's logit-normal(0, 1) sigma weighting (the published FLUX fine-tuning recipes use it
        # too); the resolution shift of FLUX's sampling is not applied to training.
        return FlowProcess(weighting="logit-normal")

    def training_kwargs(self, cond: dict[str, Any], caption: Tensor, device: torch.device) -> dict[str, Any]:
        pooled = cond.get("pooled_projections")
        if pooled is None:
            raise SparseditError(f"this {self.dense_type} also takes the pooled CLIP vector: each data item's conditions "
                                 f"need 'pooled_projections' (B, {self.config.pooled_channels}) beside "
                                 "'encoder_hidden_states'")
        return {"encoder_hidden_states": caption, "pooled_projections": pooled.to(device=device, dtype=caption.dtype)}


def pipeline_family(root: str | Path) -> FlowFamily:
    """The flow family of a diffusers pipeline folder, bound to its transformer's config (read from
    ``transformer/config.json``; the weights are not loaded): what encodes prompts for that model."""
    import json

    from sparsedit.encoders.pipeline import pipeline_class_name
    from sparsedit.families import families

    name = pipeline_class_name(root)
    known = {cls.pipeline_class: cls for cls in families() if getattr(cls, "pipeline_class", None)}
    if name not in known:
        raise SparseditError(f"{root} is not a {' or '.join(known)} folder (its model_index.json names {name!r}); pass "
                             "the local diffusers pipeline folder of an SD3 / FLUX.1 / Wan model")
    cls = known[name]
    config_path = Path(root) / "transformer" / "config.json"
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SparseditError(f"cannot read {config_path} ({err}); the pipeline folder is incomplete") from None
    return cls(cls.config_from_diffusers(cfg, str(config_path)))
