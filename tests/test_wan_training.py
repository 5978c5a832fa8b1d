"""Training a Wan on what its users have: latents directories normalised per channel as the Wan VAE asks (and
WanPipeline undoes), and data-free distillation from prompt embeddings (the dense model's own videos)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import helpers
from sparsedit.families import family_of
from sparsedit.families.wan import Wan, WanConfig
from sparsedit.train import Trainer, TrainSettings
from sparsedit.train.data import LatentsDataset, save_latents

pytestmark = pytest.mark.usefixtures("single_thread")

TEXT_DIM, TOKENS, C = 16, 5, 4
MEAN, STD = [0.5, -0.25, 0.0, 1.0], [2.0, 0.5, 1.0, 4.0]


def tiny_wan() -> Wan:
    cfg = WanConfig(input_size=(4, 6), num_frames=3, in_channels=C, out_channels=C, hidden_size=32, depth=2,
                    num_heads=2, ffn_dim=40, caption_channels=TEXT_DIM, freq_dim=32, rope_max_seq_len=32,
                    max_sequence_length=TOKENS)
    return helpers.randomize(Wan(cfg), 0.1)


def write(directory: Path, n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, 3, C, 4, 6, generator=g)  # (N, F, C, h, w): Wan VAE latents, stored unnormalised
    captions = torch.randn(n, TOKENS, TEXT_DIM, generator=g)
    meta = {"scale_factor": 1.0, "vae": "tiny AutoencoderKLWan", "resolution": 48, "latents_mean": MEAN,
            "latents_std": STD}
    save_latents(directory, latents, None, meta, kind="latents", captions=captions)
    return {"latents": latents, "captions": captions}


def test_latents_are_normalised_per_channel_as_wan_pipeline_undoes_it(tmp_path: Path) -> None:
    stored = write(tmp_path / "d")
    ds = LatentsDataset(tmp_path / "d", apply_scale_factor=True)
    x, cond = ds[1]
    mean, std = torch.tensor(MEAN).view(1, C, 1, 1), torch.tensor(STD).view(1, C, 1, 1)
    want = ((stored["latents"][1] - mean) / std).transpose(0, 1)  # (C, F, h, w)
    assert torch.allclose(x, want) and x.shape == (C, 3, 4, 6)
    assert torch.equal(cond["encoder_hidden_states"], stored["captions"][1])
    # WanPipeline decodes z * std + mean: the round trip gives the stored latent back
    assert torch.allclose(x.transpose(0, 1) * std + mean, stored["latents"][1], atol=1e-6)
    raw, _ = LatentsDataset(tmp_path / "d")[1]
    assert torch.equal(raw, stored["latents"][1].transpose(0, 1))  # unnormalised unless asked


@pytest.mark.parametrize("bad", [{"latents_mean": MEAN}, {"latents_mean": MEAN, "latents_std": [1.0, 0.0, 1.0, 1.0]},
                                 {"latents_mean": MEAN[:3], "latents_std": STD[:3]}])
def test_bad_channel_statistics_are_refused(tmp_path: Path, bad: dict) -> None:
    from sparsedit.errors import SparseditError

    meta = {"scale_factor": 1.0, "vae": "v", "resolution": 48, **bad}
    with pytest.raises(SparseditError) as err:
        save_latents(tmp_path / "d", torch.randn(2, 3, C, 4, 6), torch.zeros(2, dtype=torch.long), meta, kind="latents")
    helpers.one_line(err, "latents_mean")


def test_a_wan_trains_on_normalised_video_latents(tmp_path: Path) -> None:
    write(tmp_path / "d")
    model = tiny_wan().train()
    seen: list[torch.Tensor] = []
    model.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    ds = LatentsDataset(tmp_path / "d", apply_scale_factor=True)
    settings = TrainSettings(steps=2, batch_size=2, lr=1e-3, log_every=1, ckpt_every=100)
    Trainer(model, ds, tmp_path / "run", settings, progress=False, device="cpu").fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["vb"] == 0.0 and r["loss"] > 0 for r in rows)  # the flow loss
    assert seen[0].shape == (2, C, 3, 4, 6)


def test_data_free_distillation_samples_wan_videos_from_prompts(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    torch.manual_seed(0)
    teacher = tiny_wan().eval()
    student = tiny_wan().train()
    student.load_state_dict(teacher.state_dict())
    g = torch.Generator().manual_seed(1)
    prompts = {"embeds": torch.randn(2, TOKENS, TEXT_DIM, generator=g),
               "null_embeds": torch.zeros(2, TOKENS, TEXT_DIM)}
    settings = TrainSettings(steps=1, batch_size=2, lr=1e-4, log_every=1, ckpt_every=100, data_free=3,
                             distill_weight=1.0)
    Trainer(student, None, tmp_path / "run", settings, progress=False, device="cpu", teacher=teacher,
            prompts=prompts).fit()
    stored = load_file(tmp_path / "run" / "teacher_samples" / "teacher_samples.safetensors")
    fam = family_of(teacher)
    how = fam.teacher_sampling()
    how.pop("batch_size")
    assert (how["sampler"], how["steps"], how["cfg_scale"]) == ("euler", 50, 5.0)  # WanPipeline's defaults
    want = fam.generate(teacher, text={k: v[[0, 1, 0]] for k, v in prompts.items()}, **how, seed=0)
    assert stored["samples"].shape == (3, C, 3, 4, 6) and torch.allclose(stored["samples"], want, atol=1e-5)
