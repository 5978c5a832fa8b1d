"""Recovery recipes of ``sparsedit train`` / :class:`Trainer`: distillation from the source model (output
and feature losses, data-free), Min-SNR weighting, the EMA warm-up, merge learning rates, named recipes.

Tiny models on CPU; losses are checked against hand computations, the teacher is checked to stay frozen
and out of the checkpoints, and a killed and resumed distillation run against an uninterrupted one.
Distributed runs with distillation live in ``test_train_distributed.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import digits, settings
from sparsedit import save_model
from sparsedit.cli import main
from sparsedit.core.checkpoint import read_safetensors
from sparsedit.core.layout import parse_layout
from sparsedit.diffusion.process import create_diffusion
from sparsedit.errors import SparseditError
from sparsedit.families.dit.model import DiT, dit_config
from sparsedit.families.dit.sparsify import sparsify
from sparsedit.families.latte.model import Latte, LatteConfig
from sparsedit.families.latte.sparse import sparsify_latte
from sparsedit.families.pixart.model import PixArt, PixArtConfig
from sparsedit.families.pixart.sparse import sparsify_pixart
from sparsedit.train.distill import capture_block_outputs, feature_layers, feature_loss, output_loss
from sparsedit.train.trainer import RECIPES, Trainer, list_checkpoints

pytestmark = pytest.mark.usefixtures("single_thread")

LAYOUT = "1,1,1,0,1,1,1"  # pool, SDTM (gen, recover, dense), top: 5 blocks


def source_dit(depth: int = 5, dropout: float = 0.1, seed: int = 0) -> DiT:
    """A random 16 px digits DiT with non-zero adaLN (so every block matters)."""
    torch.manual_seed(seed)
    cfg = dit_config("DiT-S/2", 16, vae_downsample=1, in_channels=1, num_classes=10, hidden_size=32, depth=depth,
                     num_heads=2, data_space="pixel", class_dropout_prob=dropout)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model




def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# closed forms
# ------------------------------------------------------------------------------------------------


def test_min_snr_weight_matches_the_closed_form() -> None:
    d = create_diffusion(None)
    t = torch.tensor([0, 1, 10, 100, 250, 500, 999])
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    acp = np.cumprod(1 - betas)
    snr = acp / (1 - acp)
    expected = np.minimum(snr, 5.0) / snr
    np.testing.assert_allclose(d.min_snr_weight(t, 5.0).numpy(), expected[t.numpy()], rtol=1e-6)
    w = d.min_snr_weight(t, 5.0)
    assert w[-1] == 1.0 and w[0] < 1e-3  # noisy steps keep weight 1, clean ones are down-weighted
    with pytest.raises(SparseditError, match="gamma must be > 0"):
        d.min_snr_weight(t, 0.0)


def test_min_snr_weights_only_the_mse_term() -> None:
    d = create_diffusion(None)
    x0, noise = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    t = torch.tensor([1, 50, 400, 900])
    out = torch.cat([torch.randn(4, 1, 4, 4), torch.rand(4, 1, 4, 4) * 2 - 1], dim=1)
    plain = d.training_losses(lambda *a, **k: out, x0, t, noise=noise)
    w = d.min_snr_weight(t, 5.0)
    weighted = d.training_losses(lambda *a, **k: out, x0, t, noise=noise, mse_weight=w)
    torch.testing.assert_close(weighted["mse"], plain["mse"])  # reported unweighted
    torch.testing.assert_close(weighted["loss"], w * plain["mse"] + plain["vb"])


def test_ema_warmup_follows_the_formula(tmp_path: Path) -> None:
    s = settings(ema_decay=0.999)
    for n in (0, 1, 5, 100, 5000, 100000):
        assert s.ema_decay_at(n) == min(0.999, (1 + n) / (10 + n))
    assert settings(ema_decay=0.999, ema_warmup=False).ema_decay_at(3) == 0.999
    # Applied: record the weights after every step and replay the EMA by hand.
    trainer = Trainer(source_dit(depth=2), digits(), tmp_path / "run", settings(steps=3, ema_decay=0.9999),
                      progress=False)
    snapshots = [{k: v.clone() for k, v in trainer.raw.state_dict().items()}]
    batches = trainer._loader()
    for _ in range(3):
        trainer.train_step(batches)
        snapshots.append({k: v.clone() for k, v in trainer.raw.state_dict().items()})
    for key, ema in trainer.ema.state_dict().items():
        if not ema.is_floating_point():
            continue
        expected = snapshots[0][key].double()
        for n in range(3):
            d = min(0.9999, (1 + n) / (10 + n))
            expected = d * expected + (1 - d) * snapshots[n + 1][key].double()
        torch.testing.assert_close(ema.double(), expected, rtol=1e-5, atol=1e-7)


def test_output_and_feature_losses_by_hand() -> None:
    s, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(output_loss(s, t), ((s - t) ** 2).mean(dim=(1, 2, 3)))
    fs = {4: torch.randn(3, 16, 8), 9: torch.randn(3, 16, 8)}
    ft = {4: torch.randn(3, 16, 8), 9: 5 * torch.randn(3, 16, 8)}
    by_hand = sum(((fs[i] - ft[i]) ** 2).mean(dim=(1, 2)) / (ft[i] ** 2).mean() for i in (4, 9)) / 2
    torch.testing.assert_close(feature_loss(fs, ft), by_hand)
    with pytest.raises(SparseditError, match="the teacher predicts"):
        output_loss(s, t[:, :1])


# ------------------------------------------------------------------------------------------------
# feature taps
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("layout", "expected"), [
    ("2,4,1,3,1,1,2", [7, 13, 19, 25, 27]),  # SparseDiT-XL: SDTMs of 6 after 2 poolingformers
    ("1,2,1,2,1,1,1", [5, 10, 11]),  # SparseDiT-B: SDTMs of 5 after 1 poolingformer
    ("1,1,1,0,1,0,1", [2, 3]),  # no dense block: the recovery block ends the SDTM
    ("0,2,1,1,2,0,0", [3, 7]),  # r = 2, no top blocks: the last SDTM ends at the last layer
])
def test_feature_layers_are_the_sdtm_ends(layout: str, expected: list[int]) -> None:
    assert parse_layout(layout).feature_layers() == expected


def test_dit_taps_hold_the_dense_tokens_of_the_same_layer() -> None:
    teacher = source_dit(depth=12, dropout=0.0)
    student = sparsify(teacher, layout="SparseDiT-B/2", r_min=0.44, r_max=0.75)
    layers = feature_layers(student)
    assert [student.kinds[i] for i in layers] == ["dense", "dense", "top"]
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([700, 700]), torch.tensor([1, 2])
    with torch.no_grad(), capture_block_outputs(teacher, layers, 2) as feats:
        teacher(x, t, y)
    # the teacher's layer-i tokens, recomputed block by block
    h = teacher.x_embedder(x) + teacher.pos_embed
    c = teacher.t_embedder(t) + teacher.y_embedder(y)
    with torch.no_grad():
        for i, block in enumerate(teacher.blocks):
            h = block(h, c)
            if i in layers:
                torch.testing.assert_close(feats[i], h)
    with torch.no_grad(), capture_block_outputs(student, layers, 2) as sfeats:
        student(x, t, y)
    assert {i: f.shape for i, f in sfeats.items()} == {i: torch.Size([2, 64, 32]) for i in layers}
    assert not student.blocks[0]._forward_hooks  # removed on exit


def test_pixart_and_latte_taps_are_aligned_token_sets() -> None:
    torch.manual_seed(0)
    pix = PixArt(PixArtConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=5, num_heads=2,
                              caption_channels=16, null_caption_length=0))
    sp = sparsify_pixart(pix, LAYOUT, r_min=0.5, r_max=0.7)
    assert feature_layers(sp) == [3, 4] and sp.kinds[3] == "dense"
    text = torch.randn(2, 6, 16)
    for model in (pix, sp):
        with torch.no_grad(), capture_block_outputs(model, [3, 4], 2) as feats:
            model(torch.randn(2, 4, 8, 8), torch.tensor([600, 600]), text)
        assert feats[3].shape == feats[4].shape == (2, 16, 32)

    lat = Latte(LatteConfig(input_size=8, num_frames=4, patch_size=2, in_channels=4, hidden_size=32, depth=8,
                            num_heads=2, num_classes=3))
    sl = sparsify_latte(lat, "2,1,2,0,2,0,2", r_min=0.5, r_max=0.6)
    layers = feature_layers(sl)
    assert layers == [5, 7] and sl.kinds[5] == "recover_s" and sl.axes[5] == "s"  # a temporal layer of the source
    x, t, y = torch.randn(2, 4, 4, 8, 8), torch.tensor([500, 500]), torch.tensor([0, 2])
    with torch.no_grad(), capture_block_outputs(lat, layers, 2) as feats:
        lat(x, t, y)
    with torch.no_grad(), capture_block_outputs(sl, layers, 2) as sfeats:
        sl(x, t, y)
    for i in layers:
        assert feats[i].shape == sfeats[i].shape == (2, 4 * 16, 32)  # (B, F*N, D), frame-major in both
    # the dense Latte's temporal layer 5 output, put frame-major by hand: (B*N, F, D) -> (B, F, N, D)
    captured = {}
    lat.blocks[5].register_forward_hook(lambda m, a, out: captured.setdefault("raw", out))
    with torch.no_grad():
        lat(x, t, y)
    raw = captured["raw"]  # (B*N, F, D)
    by_hand = raw.reshape(2, 16, 4, 32).transpose(1, 2).reshape(2, 64, 32)
    torch.testing.assert_close(feats[5], by_hand)


# ------------------------------------------------------------------------------------------------
# distillation in the trainer
# ------------------------------------------------------------------------------------------------


def frozen_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_distillation_losses_match_a_hand_computation(tmp_path: Path) -> None:
    teacher = source_dit(dropout=0.0)
    student = sparsify(teacher, layout=LAYOUT, r_min=0.3, r_max=0.6)
    s = settings(steps=1, diffusion_weight=0.5, distill_weight=2.0, feature_weight=3.0, min_snr_gamma=5.0,
                 batch_size=4, seed=3)
    trainer = Trainer(student, digits(4), tmp_path / "run", s, progress=False, teacher=teacher)
    # replay the trainer's randomness: the batch order, the piece and t, then the noise
    gen = torch.Generator().manual_seed(trainer.gen.initial_seed())
    batches = trainer._loader()
    x, y = next(iter(trainer._loader()))
    t, _ = type(trainer.pieces)(student.config.schedule, student.config.grid, gen).sample(4)
    noise = torch.randn(x.shape, generator=gen)
    student_copy = type(student)(student.config)
    student_copy.load_state_dict(student.state_dict())
    stats = trainer.train_step(batches)

    d = create_diffusion(None)
    xt = d.q_sample(x, t, noise)
    layers = feature_layers(student_copy)
    with torch.no_grad(), capture_block_outputs(teacher, layers, 4) as tf:
        t_out = teacher(xt, t, y)
    with torch.no_grad(), capture_block_outputs(student_copy, layers, 4) as sf:
        s_out = student_copy(xt, t, y)
    acp = d.alphas_cumprod[t]
    snr = acp / (1 - acp)
    w = (snr.clamp(max=5.0) / snr).float()
    mse = ((noise - s_out[:, :1]) ** 2).mean(dim=(1, 2, 3))
    vb = d.training_losses(lambda *a, **k: s_out, x, t, noise=noise)["vb"]
    distill = ((s_out - t_out) ** 2).mean(dim=(1, 2, 3))
    feat = sum(((sf[i] - tf[i]) ** 2).mean(dim=(1, 2)) / (tf[i] ** 2).mean() for i in layers) / len(layers)
    total = (0.5 * (w * mse + vb) + 2.0 * distill + 3.0 * feat).mean()
    assert stats["mse"] == pytest.approx(mse.mean().item(), rel=1e-5)
    assert stats["distill"] == pytest.approx(distill.mean().item(), rel=1e-5)
    assert stats["feature"] == pytest.approx(feat.mean().item(), rel=1e-5)
    assert stats["loss"] == pytest.approx(total.item(), rel=1e-5)
    assert stats["distill"] > 0 and stats["feature"] > 0


def test_teacher_stays_frozen_and_out_of_the_checkpoints(tmp_path: Path) -> None:
    teacher = source_dit()
    before = frozen_copy(teacher)
    student = sparsify(teacher, layout=LAYOUT, r_min=0.3, r_max=0.6)
    s = settings(steps=3, distill_weight=1.0, feature_weight=1.0, ckpt_every=3, lr=1e-3)
    trainer = Trainer(student, digits(), tmp_path / "run", s, progress=False, teacher=teacher)
    trainer.fit()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    student_keys = set(trainer.raw.state_dict())
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    for name in ("model", "ema"):
        assert set(read_safetensors(ckpt / name / "model.safetensors")) == student_keys
    assert sorted(p.name for p in ckpt.iterdir()) == ["ema", "model", "optimizer.pt", "rng_rank0.pt", "trainer.json"]
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) == len(list(trainer.raw.parameters()))  # student parameters only
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["teacher"]["model"]["model_type"] == "DiT" and run["settings"]["feature_weight"] == 1.0


def test_teacher_drops_the_same_labels_as_the_student(tmp_path: Path) -> None:
    teacher = source_dit(dropout=0.5)
    student = sparsify(teacher, layout=LAYOUT, r_min=0.3, r_max=0.6)
    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
    teacher.y_embedder.register_forward_hook(lambda m, a, out: seen["teacher"].append(out.detach().clone()))
    student.y_embedder.register_forward_hook(lambda m, a, out: seen["student"].append(out.detach().clone()))
    s = settings(steps=3, batch_size=16, distill_weight=1.0, lr=1e-6)
    Trainer(student, digits(), tmp_path / "run", s, progress=False, teacher=teacher).fit()
    assert len(seen["teacher"]) == len(seen["student"]) == 3
    null = teacher.y_embedder.embedding_table.weight[10]
    dropped = 0
    for te, st in zip(seen["teacher"], seen["student"], strict=True):
        # the tables start equal and move by ~1e-6 a step: the same rows are the null class in both
        t_null = (te - null).abs().amax(dim=1) < 1e-9
        s_null = (st - null).abs().amax(dim=1) < 1e-4
        assert torch.equal(t_null, s_null)
        dropped += int(t_null.sum())
    assert 0 < dropped < 48  # p = 0.5 dropped some, not all


def test_distillation_needs_a_matching_teacher(tmp_path: Path) -> None:
    student = sparsify(source_dit(), layout=LAYOUT, r_min=0.3, r_max=0.6)
    with pytest.raises(SparseditError, match="need a teacher"):
        Trainer(student, digits(), tmp_path / "a", settings(distill_weight=1.0), progress=False)
    with pytest.raises(SparseditError, match="does not match the student .*depth 4 vs 5"):
        Trainer(student, digits(), tmp_path / "b", settings(distill_weight=1.0), progress=False,
                teacher=source_dit(depth=4))
    with pytest.raises(SparseditError, match="itself sparse"):
        Trainer(student, digits(), tmp_path / "c", settings(distill_weight=1.0), progress=False, teacher=student)
    with pytest.raises(SparseditError, match="--distill-weight, --feature-weight and --data-free are 0"):
        Trainer(student, digits(), tmp_path / "d", settings(), progress=False, teacher=source_dit())
    with pytest.raises(SparseditError, match="needs a sparse student"):
        Trainer(source_dit(), digits(), tmp_path / "e", settings(feature_weight=1.0), progress=False,
                teacher=source_dit())
    with pytest.raises(SparseditError, match="every loss weight is 0"):
        settings(diffusion_weight=0.0).validate(1)


def test_data_free_trains_on_cached_teacher_samples(tmp_path: Path) -> None:
    teacher = source_dit()
    student = sparsify(teacher, layout=LAYOUT, r_min=0.3, r_max=0.6)
    s = settings(steps=2, data_free=12, distill_weight=1.0)
    trainer = Trainer(student, None, tmp_path / "run", s, progress=False, teacher=teacher)
    trainer.fit()
    cache = tmp_path / "run" / "teacher_samples"
    data = read_safetensors(cache / "teacher_samples.safetensors")
    assert data["samples"].shape == (12, 1, 16, 16) and data["labels"].tolist() == [i % 10 for i in range(12)]
    assert data["samples"].abs().max() <= 1
    assert torch.equal(trainer.dataset.samples, data["samples"])
    # a second run with the same settings reads the cache instead of sampling (the teacher is not called)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    again = Trainer(sparsify(teacher, layout=LAYOUT, r_min=0.3, r_max=0.6), None, tmp_path / "run",
                    settings(steps=3, data_free=12, distill_weight=1.0), progress=False, teacher=teacher)
    again.fit()  # resumes from step 2's checkpoint
    assert len(calls) == 1  # one distillation forward (step 3), no sampling
    with pytest.raises(SparseditError, match="class-conditional DiT"):
        lat = Latte(LatteConfig(input_size=8, num_frames=2, patch_size=2, in_channels=4, hidden_size=32, depth=8,
                                num_heads=2, num_classes=3))
        Trainer(sparsify_latte(lat, "2,1,2,0,2,0,2", r_min=0.5, r_max=0.6), None, tmp_path / "latte",
                settings(data_free=4, distill_weight=1.0), progress=False, teacher=lat).fit()


def test_merge_layers_get_their_own_learning_rate(tmp_path: Path) -> None:
    student = sparsify(source_dit(), layout=LAYOUT, r_min=0.3, r_max=0.6)
    trainer = Trainer(student, digits(), tmp_path / "run", settings(merge_lr_scale=10.0, lr=2e-4), progress=False)
    groups = trainer.opt.param_groups
    assert [g["lr"] for g in groups] == [2e-4, 2e-3]
    merge = {id(p) for n, p in student.named_parameters() if ".merge_" in n}
    assert {id(p) for p in groups[1]["params"]} == merge and len(merge) == 4  # W1, W2 weights and biases
    assert len(Trainer(sparsify(source_dit(), layout=LAYOUT), digits(), tmp_path / "one", settings(),
                       progress=False).opt.param_groups) == 1


# ------------------------------------------------------------------------------------------------
# the CLI: recipes, defaults, kill and resume
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(source_dit(), tmp_path_factory.mktemp("src") / "dit5")


def cli_args(run_dir: Path, source: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--init-from", str(source), "--layout", LAYOUT, "--r-min", "0.3", "--r-max", "0.6",
            "--batch-size", "8", "--steps", str(steps), "--ckpt-every", "2", "--log-every", "1", "--no-progress",
            "--device", "cpu", "--run-dir", str(run_dir), *extra]


def test_cli_default_recipe_with_layout(tmp_path: Path, source_ckpt: Path) -> None:
    from sparsedit.train.trainer import DEFAULT_RECIPE

    assert main(cli_args(tmp_path / "run", source_ckpt, 2)) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert DEFAULT_RECIPE == "min-snr" and RECIPES[DEFAULT_RECIPE] == {"min_snr_gamma": 5.0}
    assert run["settings"]["min_snr_gamma"] == 5.0 and run["settings"]["distill_weight"] == 0.0
    assert "teacher" not in run
    # without --layout (a dense fine-tune or from scratch) the default is the plain diffusion loss
    scratch = ["train", "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2",
               "--batch-size", "8", "--steps", "1", "--no-progress", "--device", "cpu"]
    assert main([*scratch, "--run-dir", str(tmp_path / "scratch")]) == 0
    assert json.loads((tmp_path / "scratch" / "run.json").read_text())["settings"]["min_snr_gamma"] == 0.0


def test_cli_distill_recipe_distils_from_the_init_from_model(tmp_path: Path, source_ckpt: Path) -> None:
    assert main(cli_args(tmp_path / "run", source_ckpt, 2, "--recipe", "distill")) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["settings"]["distill_weight"] == 1.0 and run["teacher"]["path"] == str(source_ckpt)
    assert all(r["distill"] > 0 for r in records(tmp_path / "run"))


def test_cli_explicit_options_override_the_recipe(tmp_path: Path, source_ckpt: Path) -> None:
    args = cli_args(tmp_path / "run", source_ckpt, 2, "--recipe", "distill-feature", "--feature-weight", "0.5",
                    "--min-snr-gamma", "5", "--no-ema-warmup")
    assert main(args) == 0
    s = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert (s["distill_weight"], s["feature_weight"], s["min_snr_gamma"], s["ema_warmup"]) == (1.0, 0.5, 5.0, False)
    assert main(cli_args(tmp_path / "paper", source_ckpt, 2, "--recipe", "paper")) == 0
    assert all(r["distill"] == 0 for r in records(tmp_path / "paper"))
    assert "teacher" not in json.loads((tmp_path / "paper" / "run.json").read_text())


def test_cli_refusals(tmp_path: Path, source_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scratch = ["train", "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2",
               "--steps", "1", "--no-progress", "--device", "cpu"]
    assert main([*scratch, "--distill-weight", "1", "--run-dir", str(tmp_path / "a")]) == 2
    assert "pass --teacher CKPT" in capsys.readouterr().err
    assert main([*scratch, "--teacher", str(source_ckpt), "--run-dir", str(tmp_path / "b")]) == 2
    assert "--teacher needs --distill-weight" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(tmp_path / "c", source_ckpt, 2, "--distill-weight", "-1"))
    assert exit_info.value.code == 2 and "must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_run_without_the_new_settings_still_resumes(tmp_path: Path, source_ckpt: Path) -> None:
    """A run.json written before the recipes and the recovery switches existed resumes (read as the old behaviour)."""
    args = cli_args(tmp_path / "run", source_ckpt, 2, "--recipe", "paper", "--no-ema-warmup")
    assert main(args) == 0
    run_file = tmp_path / "run" / "run.json"
    run = json.loads(run_file.read_text())
    for key in ("ema_warmup", "min_snr_gamma", "diffusion_weight", "distill_weight", "feature_weight",
                "merge_lr_scale", "data_free"):
        del run["settings"][key]
    for key in ("recovery_pos_embed", "extra_recovery"):  # SparseDiT config fields added later
        del run["model"][key]
    run_file.write_text(json.dumps(run))
    assert main(cli_args(tmp_path / "run", source_ckpt, 4, "--recipe", "paper", "--no-ema-warmup")) == 0
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2, 3, 4]


@pytest.mark.parametrize("recipe", ["distill-feature", "data-free"])
def test_kill_and_resume_with_distillation_logs_the_same_losses(recipe: str, tmp_path: Path,
                                                               source_ckpt: Path) -> None:
    from test_train import child_env, losses, start_and_kill

    extra = ["--recipe", recipe, "--min-snr-gamma", "5"] + (["--data-free", "24"] if recipe == "data-free" else [])
    kill_at = 5
    for attempt, steps in enumerate((16, 64, 256)):
        killed = tmp_path / f"killed{attempt}"
        cmd = [sys.executable, "-m", "sparsedit", *cli_args(killed, source_ckpt, steps, *extra)]
        if start_and_kill(cmd, killed, kill_at):
            break
    else:
        pytest.fail("the run always finished before it could be killed")
    out = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ref = tmp_path / "reference"
    assert main(cli_args(ref, source_ckpt, steps, *extra)) == 0
    expected = records(ref)
    got = records(killed)
    keys = ("step", "loss", "mse", "vb", "distill", "feature", "grid")
    assert [tuple(r[k] for k in keys) for r in got] == [tuple(r[k] for k in keys) for r in expected]
    assert losses(killed) == losses(ref)
    assert all(r["distill"] > 0 for r in expected)
    if recipe == "distill-feature":
        assert all(r["feature"] > 0 for r in expected)
