"""Sampling SD3 and FLUX with sparsedit's own flow sampler equals their diffusers pipelines on the same noise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

import helpers
import sparsedit
from sparsedit.errors import SparseditError
from sparsedit.families import family_of
from sparsedit.families.flux.model import pack_latents

pytestmark = pytest.mark.usefixtures("single_thread")


def no_encoders(*names: str) -> dict[str, None]:
    return dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", *names])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_sd3_sampling_equals_the_pipeline(tmp_path: Path) -> None:
    from test_lora import sd3_reference

    ref = sd3_reference()
    ref.save_pretrained(tmp_path)
    model = sparsedit.load_model(tmp_path)
    g = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(1, 5, 24, generator=g), torch.randn(1, 12, generator=g)
    null, null_pooled = torch.randn(1, 5, 24, generator=g), torch.randn(1, 12, generator=g)
    noise = torch.randn(1, 4, 16, 16, generator=g)
    pipe = StableDiffusion3Pipeline(transformer=ref, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    **no_encoders("text_encoder_3", "tokenizer_3"))
    theirs = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=null,
                  negative_pooled_prompt_embeds=null_pooled, latents=noise, num_inference_steps=4, guidance_scale=5.0,
                  height=128, width=128, output_type="latent").images
    ours = family_of(model).generate(model, text={"embeds": embeds, "pooled": pooled, "null_embeds": null,
                                                  "null_pooled": null_pooled}, steps=4, cfg_scale=5.0, noise=noise)
    assert relative(ours, theirs) < 1e-5


def test_flux_sampling_equals_the_pipeline(tmp_path: Path) -> None:
    from test_lora import flux_reference

    ref = flux_reference()
    ref.save_pretrained(tmp_path)
    model = sparsedit.load_model(tmp_path)
    g = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(1, 5, 24, generator=g), torch.randn(1, 12, generator=g)
    noise = torch.randn(1, 4, 12, 16, generator=g)  # a 6 x 8 token grid
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(transformer=ref, scheduler=scheduler, **no_encoders())
    theirs = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=pack_latents(noise), num_inference_steps=4,
                  guidance_scale=3.5, height=96, width=128, output_type="latent").images
    ours = family_of(model).generate(model, text={"embeds": embeds, "pooled": pooled}, steps=4, noise=noise)
    assert relative(pack_latents(ours), theirs) < 1e-5


def test_flux_refuses_classifier_free_guidance_and_sd3_needs_pooled_embeddings(tmp_path: Path) -> None:
    from test_lora import flux_reference, sd3_reference

    flux_reference().save_pretrained(tmp_path / "f")
    sd3_reference().save_pretrained(tmp_path / "s")
    flux, sd3 = sparsedit.load_model(tmp_path / "f"), sparsedit.load_model(tmp_path / "s")
    text = {"embeds": torch.zeros(1, 5, 24), "pooled": torch.zeros(1, 12)}
    with pytest.raises(SparseditError) as err:
        family_of(flux).generate(flux, text=text, cfg_scale=4.0)
    helpers.one_line(err, "guidance-distilled")
    with pytest.raises(SparseditError) as err:
        family_of(sd3).generate(sd3, text={"embeds": text["embeds"]})
    helpers.one_line(err, "pooled")
