"""LoRA fine-tuning (sparsedit.train.lora): only adapters and merges change, checkpoints are plain merged models,
and a killed LoRA run resumes to the same losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import helpers
import sparsedit
from sparsedit.errors import SparseditError
from sparsedit.families.dit.sparsify import sparsify
from sparsedit.train import Trainer, TrainSettings
from sparsedit.train.lora import merged_state

pytestmark = pytest.mark.usefixtures("single_thread")


def student() -> torch.nn.Module:
    torch.manual_seed(0)  # the same frozen weights every time (a resume needs the interrupted run's)
    dit = helpers.randomize(sparsedit.DiT(sparsedit.DiTConfig(input_size=8, patch_size=2, in_channels=1,
                                                              hidden_size=32, depth=5, num_heads=2, num_classes=10,
                                                              data_space="pixel")), 0.1)
    return sparsify(dit, layout="1,1,1,1,1,0,1", r_min=0.3, r_max=0.8)


def settings(**kw: object) -> TrainSettings:
    return TrainSettings(**{"steps": 4, "batch_size": 4, "lr": 1e-2, "log_every": 1, "ckpt_every": 2,
                            "lora_rank": 2, **kw})


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture()
def dataset():  # noqa: ANN201
    from sparsedit.train.data import DigitsDataset

    return DigitsDataset(split="train", resolution=8)


def test_only_adapters_and_merges_change_and_the_checkpoint_is_a_plain_model(tmp_path: Path, dataset) -> None:  # noqa: ANN001
    model = student()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, dataset, tmp_path / "run", settings(), progress=False, device="cpu")
    trained = sum(p.numel() for p in trainer.raw.parameters() if p.requires_grad)
    assert 0 < trained < sum(p.numel() for p in before.values()) / 4
    out = trainer.fit()
    after = merged_state(trainer.raw)
    assert set(after) == set(before)  # plain sparsedit names: no adapter leaks into the model
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert any(".merge_" in k for k in changed) and any("attn" in k or "mlp" in k for k in changed)
    assert not any(k.startswith(("x_embedder", "t_embedder", "y_embedder", "final_layer")) for k in changed)
    loaded = sparsedit.load_model(out)  # the final EMA model: an ordinary sparsedit checkpoint
    assert type(loaded).__name__ == "SparseDiT"


def test_a_killed_lora_run_resumes_to_the_same_losses(tmp_path: Path, dataset) -> None:  # noqa: ANN001
    Trainer(student(), dataset, tmp_path / "full", settings(), progress=False, device="cpu").fit()
    Trainer(student(), dataset, tmp_path / "cut", settings(steps=2), progress=False, device="cpu").fit()
    Trainer(student(), dataset, tmp_path / "cut", settings(), progress=False, device="cpu").fit()
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), rel=1e-6)


def test_resuming_on_other_frozen_weights_is_refused(tmp_path: Path, dataset) -> None:  # noqa: ANN001
    Trainer(student(), dataset, tmp_path / "run", settings(steps=2), progress=False, device="cpu").fit()
    other = student()
    with torch.no_grad():
        other.blocks[0].attn.proj.weight.add_(1.0)
    with pytest.raises(SparseditError) as err:
        Trainer(other, dataset, tmp_path / "run", settings(), progress=False, device="cpu").fit()
    helpers.one_line(err, "other frozen weights", "--init-from")


def test_lora_settings_are_checked() -> None:
    with pytest.raises(SparseditError, match=">= 0"):
        TrainSettings(lora_rank=-1).validate(1)


def test_a_sparse_sd3_trains_adapters_with_the_flow_loss(tmp_path: Path) -> None:
    from sparsedit.families.sd3 import sparsify_sd3
    from test_train_flow import CaptionLatents, tiny_sd3

    torch.manual_seed(0)
    model = sparsify_sd3(tiny_sd3(), "0,1,1,1,1,0,1")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, CaptionLatents(), tmp_path / "run", settings(steps=2, ckpt_every=2), progress=False,
                      device="cpu")
    trainer.fit()
    after = merged_state(trainer.raw)
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("blocks.") for k in changed)  # adapters and merges live in the blocks
    assert sparsedit.load_model(tmp_path / "run" / "model").config.model_type == "SparseSD3"
