"""diffusers interop: a sparsedit model is a drop-in transformer for DiTPipeline (built offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

import sparsedit
from sparsedit.errors import SparseditError
from sparsedit.families.dit.sparse import SparseDiT
from sparsedit.interop import use_in_pipeline


def tiny_vae(blocks: int = 1) -> AutoencoderKL:
    """A random 4-channel VAE that downsamples by ``2 ** (blocks - 1)`` (1 block: latents are images)."""
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(8,) * blocks,
                         latent_channels=4, norm_num_groups=4, layers_per_block=1).eval()


def dit_transformer() -> DiTTransformer2DModel:
    """A tiny random DiTTransformer2DModel whose blocks share one timestep/label embedder (as released)."""
    torch.manual_seed(0)
    ref = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                num_layers=5, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
        shared = ref.transformer_blocks[0].norm1.emb.state_dict()
        for block in ref.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(shared)
    return ref


@pytest.fixture()
def diffusers_dit(tmp_path):
    ref = dit_transformer()
    ref.save_pretrained(tmp_path / "transformer")
    return ref, tmp_path / "transformer"


def run(pipe, scheduler_cls=DDIMScheduler) -> np.ndarray:
    pipe.scheduler = scheduler_cls(num_train_timesteps=1000, beta_schedule="linear")
    gen = torch.Generator().manual_seed(0)
    return pipe(class_labels=[1, 2], num_inference_steps=4, guidance_scale=3.0, generator=gen, output_type="np").images


def test_loaded_model_is_a_drop_in_for_the_diffusers_transformer(diffusers_dit):
    ref, path = diffusers_dit
    pipe = DiTPipeline(transformer=ref, vae=tiny_vae(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    expected = run(pipe)
    use_in_pipeline(pipe, sparsedit.load_model(path))
    got = run(pipe)
    assert got.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_sparse_model_runs_in_pipeline_with_per_step_grids(diffusers_dit, scheduler_cls):
    ref, path = diffusers_dit
    sparse = sparsedit.sparsify(sparsedit.load_model(path), layout="1,1,1,1,1,0,1", r_min=0.3, r_max=0.8)
    assert isinstance(sparse, SparseDiT)
    seen: list[tuple[int, int]] = []
    gen_block = sparse.blocks[sparse.kinds.index("gen")]
    gen_block.register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    pipe = DiTPipeline(transformer=ref, vae=tiny_vae(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    use_in_pipeline(pipe, sparse)
    images = run(pipe, scheduler_cls)
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    timesteps = [int(t) for t in pipe.scheduler.timesteps]
    expected = [h * w for h, w in sparse.config.schedule.grids_for_timesteps(timesteps, sparse.config.grid)]
    assert seen == expected
    assert len(set(seen)) > 1  # the grid really changes over the run


def test_swap_refuses_a_mismatched_model(diffusers_dit, tmp_path):
    ref, _ = diffusers_dit
    other = sparsedit.DiT(sparsedit.DiTConfig(input_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                                              num_heads=2))
    pipe = DiTPipeline(transformer=ref, vae=tiny_vae(), scheduler=DDIMScheduler())
    with pytest.raises(SparseditError, match="sample_size=8 but the sparsedit model has 16"):
        use_in_pipeline(pipe, other)
    assert pipe.transformer is ref
