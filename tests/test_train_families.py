"""Training PixArt-alpha / SparsePixArt and Latte / SparseLatte (class and text variants) with
:class:`sparsedit.train.trainer.Trainer` and ``sparsedit train``.

The central check recomputes the first step's loss outside the trainer: the documented data order,
timestep and noise draws (and caption/label dropout from the global RNG) are redone here and the
model is called directly with its own signature; the trainer's logged loss must match. Further:
one token set per sparse batch, exact resume, the CLI fine-tunes (the final model loads with
``load_model`` as the right class) and one-line errors for data that does not fit.

Tiny models on tiny synthetic latents directories written with ``save_latents``; CPU, one thread.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from helpers import randomize
from sparsedit import load_model, save_model
from sparsedit.cli import main
from sparsedit.diffusion.process import create_diffusion
from sparsedit.errors import SparseditError
from sparsedit.families.latte.model import Latte, LatteConfig
from sparsedit.families.latte.sparse import SparseLatte, VideoPieceSampler, sparsify_latte, video_pieces
from sparsedit.families.pixart.model import PixArt, PixArtConfig
from sparsedit.families.pixart.sparse import SparsePixArt, sparsify_pixart
from sparsedit.train.data import LatentsDataset, save_latents
from sparsedit.train.trainer import Trainer, TrainSettings, list_checkpoints

pytestmark = pytest.mark.usefixtures("single_thread")

N, L, D_TEXT, FRAMES = 8, 6, 16, 4  # items, caption tokens, caption width, video frames
META = {"scale_factor": 0.5, "vae": "test-vae", "resolution": 128}
PIXART_LAYOUT = "1,1,1,0,1,0,1"  # pool, SDTM (gen, recover), top: 4 blocks
LATTE_LAYOUT = "2,1,2,2,2,0,2"  # 2 pool, video SDTM (gen s/t, 2 sparse, recover t/s), 2 top: 10 blocks
BATCH = 4


# ------------------------------------------------------------------------------------------------
# models and data
# ------------------------------------------------------------------------------------------------


def tiny_pixart(**kw: Any) -> PixArt:
    """16 x 16 latents (8 x 8 tokens: the schedule gives 5x5, 4x4 and 3x3 grids), 4 blocks, hidden 32."""
    torch.manual_seed(0)
    fields: dict[str, Any] = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2,
                                  caption_channels=D_TEXT, null_caption_length=L, class_dropout_prob=0.5)
    fields.update(kw)
    return randomize(PixArt(PixArtConfig(**fields)))


def tiny_latte(conditioning: str, **kw: Any) -> Latte:
    """4 frames of 16 x 16 latents (8 x 8 tokens per frame), 10 blocks, hidden 32."""
    torch.manual_seed(0)
    fields: dict[str, Any] = dict(input_size=16, num_frames=FRAMES, patch_size=2, in_channels=4, hidden_size=32,
                                  depth=10, num_heads=2, conditioning=conditioning, num_classes=3,
                                  caption_channels=D_TEXT, class_dropout_prob=0.5)
    fields.update(kw)
    return randomize(Latte(LatteConfig(**fields)))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "pixart": tiny_pixart,
    "pixart_ms": lambda: tiny_pixart(hidden_size=48, use_additional_conditions=True),  # 1024-MS size conditions
    "sparse_pixart": lambda: sparsify_pixart(tiny_pixart(), PIXART_LAYOUT).train(),
    "latte_class": lambda: tiny_latte("class"),
    "sparse_latte_class": lambda: sparsify_latte(tiny_latte("class"), LATTE_LAYOUT, r_min=0.61, r_max=0.86).train(),
    "latte_text": lambda: tiny_latte("text"),
    "sparse_latte_text": lambda: sparsify_latte(tiny_latte("text"), LATTE_LAYOUT, r_min=0.61, r_max=0.86).train(),
}


def captions(n: int = N, width: int = D_TEXT) -> tuple[Tensor, Tensor]:
    """fp16 T5-like embeddings (n, L, width) and a keep-mask with 3..L real tokens per caption."""
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(n, L, width, generator=g).half()
    lengths = torch.randint(3, L + 1, (n,), generator=g)
    return emb, (torch.arange(L)[None] < lengths[:, None]).long()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Latents directories: images with captions, videos with labels + captions + null caption, and bad ones."""
    root = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(2)
    emb, mask = captions()
    null = torch.randn(L, D_TEXT, generator=g).half()
    images = torch.randn(N, 8, 16, 16, generator=g)  # moments: mean and logvar of 4 channels
    images[:, 4:] = -3.0
    videos = torch.randn(N, FRAMES, 8, 16, 16, generator=g)  # (N, F, 2C, h, w)
    videos[:, :, 4:] = -3.0
    labels = torch.arange(N) % 3
    return {
        "images": save_latents(root / "images", images, None, META, captions=emb, caption_mask=mask),
        "videos": save_latents(root / "videos", videos, labels, META, captions=emb, caption_mask=mask,
                               null_caption=null),
        "image_labels": save_latents(root / "image_labels", images, labels, META),
        "videos_no_null": save_latents(root / "videos_no_null", videos, labels, META, captions=emb,
                                       caption_mask=mask),
        "videos_3f": save_latents(root / "videos_3f", videos[:, :3], labels, META, captions=emb, caption_mask=mask,
                                  null_caption=null),
        "images_wide": save_latents(root / "images_wide", images, None, META, captions=captions(width=8)[0]),
    }


def data_for(name: str, data: dict[str, Path]) -> LatentsDataset:
    return LatentsDataset(data["images" if "pixart" in name else "videos"], apply_scale_factor=True)


def settings(**kw: Any) -> TrainSettings:
    base: dict[str, Any] = dict(steps=1, batch_size=BATCH, lr=1e-3, log_every=1, ckpt_every=100)
    base.update(kw)
    return TrainSettings(**base)


def losses(run_dir: Path) -> list[tuple[int, float, float, float, str]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["mse"], r["vb"], r["grid"]) for r in map(json.loads, lines)]


# ------------------------------------------------------------------------------------------------
# the trainer's loss, recomputed outside it
# ------------------------------------------------------------------------------------------------


def token_set(model: nn.Module, t: int) -> Any:
    """The sparse token set a model uses at timestep t (None for a dense model)."""
    cfg = model.config
    if isinstance(model, SparseLatte):
        return cfg.tokens_at(t)
    if isinstance(model, SparsePixArt):
        return cfg.schedule.grid(t, cfg.grid)
    return None


def token_label(model: nn.Module, t: int) -> str:
    """What the log shows for a batch at timestep t: dense, 5x5 or 4x4x2f (grid x frames)."""
    tokens = token_set(model, t)
    if tokens is None:
        return "dense"
    (h, w), frames = tokens if isinstance(model, SparseLatte) else (tokens, None)
    return f"{h}x{w}" + ("" if frames is None else f"x{frames}f")


def first_step_inputs(model: nn.Module, ds: LatentsDataset, seed: int = 0) -> tuple[Tensor, dict[str, Any], Tensor,
                                                                                     Tensor]:
    """x, the collated conditions, t and noise of step 1, drawn as docs/training.md describes."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:BATCH]  # epoch 0
    items = [ds[int(i)] for i in order]
    x = torch.stack([item[0] for item in items])
    cond = {k: torch.stack([torch.as_tensor(item[1][k]) for item in items]) for k in items[0][1]}
    gen = torch.Generator().manual_seed(seed * 1000)  # rank 0
    if token_set(model, 0) is None:
        t = torch.randint(0, 1000, (BATCH,), generator=gen)
    else:  # a piece with probability length / T, then t uniform inside it
        u = int(torch.randint(0, 1000, (1,), generator=gen))
        same = [s for s in range(1000) if token_set(model, s) == token_set(model, u)]
        t = torch.randint(same[0], same[-1] + 1, (BATCH,), generator=gen)
    return x, cond, t, torch.randn(x.shape, generator=gen)


def direct_loss(model: nn.Module, x: Tensor, cond: dict[str, Any], t: Tensor, noise: Tensor) -> Tensor:
    """The hybrid loss with the model called by its own signature."""
    caption, mask = cond["encoder_hidden_states"], cond["encoder_attention_mask"]
    size = x.shape[-1] * 8.0  # PixArt-MS: image size in pixels (square) and aspect ratio 1

    def call(xt: Tensor, tt: Tensor) -> Tensor:
        if isinstance(model, PixArt):
            extra = ({"resolution": torch.tensor([[size, size]] * x.shape[0]), "aspect_ratio": torch.ones(x.shape[0], 1)}
                     if model.config.use_additional_conditions else None)
            return model(xt, tt, caption, mask, extra)
        if model.config.text:
            return model(xt, tt, encoder_hidden_states=caption, encoder_attention_mask=mask)
        return model(xt, tt, cond["y"])

    return create_diffusion(None, learn_sigma=True).training_losses(call, x, t, {}, noise)["loss"].mean()


@pytest.mark.parametrize("name", list(MODELS))
def test_trainer_loss_equals_a_direct_model_call(name: str, data: dict[str, Path], tmp_path: Path) -> None:
    model = MODELS[name]()
    twin = copy.deepcopy(model).train()
    ds = data_for(name, data)
    trainer = Trainer(model, ds, tmp_path / "run", settings(), progress=False, device="cpu")
    trainer.fit()
    logged = losses(tmp_path / "run")[0]

    x, cond, t, noise = first_step_inputs(twin, ds)
    torch.manual_seed(0)  # the global RNG of rank 0: label / caption dropout with p = 0.5
    dropped = dict(cond)
    if name in ("latte_text", "sparse_latte_text"):  # no stored null caption: the trainer drops to the data's
        drop = torch.rand(BATCH) < 0.5
        assert 0 < int(drop.sum()) < BATCH
        dropped["encoder_hidden_states"] = torch.where(drop[:, None, None], ds.null_caption,
                                                       cond["encoder_hidden_states"])
    expected = direct_loss(twin, x, dropped, t, noise)  # PixArt and class Latte drop inside the model
    assert logged[1] == pytest.approx(expected.item(), rel=1e-6, abs=1e-7)
    assert logged[4] == token_label(twin, int(t[0]))
    # The dropout is part of what matched: without it the loss differs.
    torch.manual_seed(1234)
    twin.eval()  # no label / caption dropout inside the model
    undropped = direct_loss(twin, x, cond, t, noise)
    assert abs(undropped.item() - logged[1]) > 1e-3


def test_pixart_caption_dropout_to_the_stored_null_caption(data: dict[str, Path], tmp_path: Path) -> None:
    """p = 1: every caption is the model's null caption (dropped once, inside the model), mask kept."""
    model = tiny_pixart(class_dropout_prob=1.0)
    twin = copy.deepcopy(model).eval()
    ds = data_for("pixart", data)
    trainer = Trainer(model, ds, tmp_path / "run", settings(), progress=False, device="cpu")
    assert trainer.null_caption is None  # the trainer leaves dropping to the CaptionEmbedder
    trainer.fit()
    x, cond, t, noise = first_step_inputs(twin, ds)
    cond["encoder_hidden_states"] = twin.null_caption(BATCH)
    assert losses(tmp_path / "run")[0][1] == pytest.approx(direct_loss(twin, x, cond, t, noise).item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# sparse batches and resume
# ------------------------------------------------------------------------------------------------


def test_video_pieces_are_the_runs_of_one_token_set() -> None:
    model = MODELS["sparse_latte_text"]()
    pieces = video_pieces(model.config)
    assert pieces[0].t_start == 0 and pieces[-1].t_end == 1000 and len(pieces) >= 3
    for a, b in zip(pieces[:-1], pieces[1:], strict=True):
        assert a.t_end == b.t_start and (a.grid, a.frames) != (b.grid, b.frames)
    for p in pieces:
        assert {model.config.tokens_at(t) for t in range(p.t_start, p.t_end)} == {(p.grid, p.frames)}
    sampler = VideoPieceSampler(model.config, torch.Generator().manual_seed(0))
    draws = [sampler.sample(2)[1].t_start for _ in range(1000)]
    for p in pieces:  # drawn with probability length / T (binomial standard deviation <= 0.016)
        assert abs(draws.count(p.t_start) / 1000 - p.length / 1000) < 0.05


@pytest.mark.parametrize("name", ["sparse_pixart", "sparse_latte_text"])
def test_sparse_batches_share_one_token_set(name: str, data: dict[str, Path], tmp_path: Path) -> None:
    model = MODELS[name]()
    trainer = Trainer(model, data_for(name, data), tmp_path / "run", settings(steps=6, grad_accum=2),
                      progress=False, device="cpu")
    drawn: list[Any] = []
    sample = trainer.pieces.sample

    def recording(n: int, device: Any = None) -> Any:
        t, piece = sample(n, device)
        drawn.append((piece, t))
        return t, piece

    trainer.pieces.sample = recording  # type: ignore[method-assign]
    trainer.fit()
    assert len(drawn) == 12  # one piece per micro-batch
    for piece, t in drawn:  # every t of a micro-batch uses its piece's token set
        assert t.shape == (2,) and {token_set(model, int(v)) for v in t} == {token_set(model, piece.t_start)}
    assert len({token_set(model, piece.t_start) for piece, _ in drawn}) > 1
    # the log shows the token set of each step's last micro-batch
    assert [r[4] for r in losses(tmp_path / "run")] == [token_label(model, p.t_start) for p, _ in drawn[1::2]]


@pytest.mark.parametrize("name", ["sparse_pixart", "sparse_latte_text", "latte_class"])
def test_resume_gives_identical_losses_and_weights(name: str, data: dict[str, Path], tmp_path: Path) -> None:
    def run(run_dir: Path, steps: int) -> Trainer:
        trainer = Trainer(MODELS[name](), data_for(name, data), run_dir, settings(steps=steps, ckpt_every=2),
                          progress=False, device="cpu")
        trainer.fit()
        return trainer

    full = run(tmp_path / "full", 4)
    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 4)
    assert resumed.step == 4 and losses(tmp_path / "part") == losses(tmp_path / "full")
    assert [r[0] for r in losses(tmp_path / "full")] == [1, 2, 3, 4]
    for a, b in ((full.raw, resumed.raw), (full.ema, resumed.ema)):
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), key
    final = load_model(tmp_path / "part" / "model")
    assert type(final) is type(full.raw)
    for key, value in full.ema.state_dict().items():
        assert torch.equal(value, final.state_dict()[key]), key


# ------------------------------------------------------------------------------------------------
# the CLI
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {"pixart": save_model(tiny_pixart(), root / "pixart"),
            "latte_text": save_model(tiny_latte("text"), root / "latte_text")}


def cli(*args: str | Path) -> int:
    return main(["train", "--batch-size", str(BATCH), "--steps", "2", "--ckpt-every", "2", "--log-every", "1",
                 "--no-progress", "--device", "cpu", *map(str, args)])


def test_cli_fine_tunes_pixart(checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    assert cli("--init-from", checkpoints["pixart"], "--data", data["images"], "--sample-every", "1",
               "--run-dir", run_dir) == 0
    assert "note: --sample-every draws no grids for a PixArt" in capsys.readouterr().out
    final = load_model(run_dir / "model")
    assert type(final) is PixArt and final.config == load_model(checkpoints["pixart"]).config
    assert [r[4] for r in losses(run_dir)] == ["dense", "dense"] and not (run_dir / "samples").exists()
    info = json.loads((run_dir / "run.json").read_text())["data"]
    assert info["caption_shape"] == [L, D_TEXT] and info["labels"] is False and "num_frames" not in info


def test_cli_fine_tunes_a_sparse_latte(checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert cli("--init-from", checkpoints["latte_text"], "--layout", LATTE_LAYOUT, "--data", data["videos"],
               "--run-dir", run_dir) == 0
    final = load_model(run_dir / "model")
    assert type(final) is SparseLatte and final.config.layout.as_string() == LATTE_LAYOUT
    assert (final.config.r_min, final.config.r_max) == (0.80, 0.93)  # unset rates: the paper's video range (Table 2)
    assert all(r[4].endswith("f") for r in losses(run_dir))  # grid x frames of SparseLatte's token set
    assert json.loads((run_dir / "run.json").read_text())["data"]["num_frames"] == FRAMES


# ------------------------------------------------------------------------------------------------
# data that does not fit
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ckpt", "dataset", "message"), [
    ("pixart", "image_labels", "a text-conditional model vs data without caption embeddings"),
    ("pixart", "images_wide", "caption width 16 vs 8 in the data"),
    ("pixart", "videos", "an image model vs videos of 4 frames in the data"),
    ("latte_text", "videos_3f", "4 frames vs 3 in the data"),
    ("latte_text", "images", "4 frames vs no frames (images) in the data"),
    ("latte_text", "videos_no_null", "stores no null caption, so caption dropout (p = 0.5"),
])
def test_cli_refuses_data_that_does_not_fit(ckpt: str, dataset: str, message: str, checkpoints: dict[str, Path],
                                            data: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("--init-from", checkpoints[ckpt], "--data", data[dataset], "--run-dir", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparsedit train: error: ") and message in err
    assert not (tmp_path / "run").exists()


def test_trainer_refuses_mismatched_data_and_items(data: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SparseditError, match="6 caption tokens .its null caption's length. vs 5 in the data"):
        Trainer(tiny_pixart(), _short_captions(tmp_path), tmp_path / "a", settings(), progress=False, device="cpu")
    labels_only = torch.utils.data.Subset(LatentsDataset(data["image_labels"]), range(N))  # not checked up front
    trainer = Trainer(tiny_pixart(), labels_only, tmp_path / "b", settings(), progress=False, device="cpu")
    with pytest.raises(SparseditError, match="is text-conditional but the data items carry no caption embeddings"):
        trainer.fit()
    assert not list_checkpoints(tmp_path / "b")


def _short_captions(tmp_path: Path) -> LatentsDataset:
    emb, mask = captions()
    save_latents(tmp_path / "short", torch.randn(N, 4, 16, 16), None, META, kind="latents", captions=emb[:, :5],
                 caption_mask=mask[:, :5])
    return LatentsDataset(tmp_path / "short")


# ------------------------------------------------------------------------------------------------
# several processes
# ------------------------------------------------------------------------------------------------


def test_fsdp_fine_tunes_a_sparse_latte_under_torchrun(checkpoints: dict[str, Path], data: dict[str, Path],
                                                       tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sparsedit",
           "train", "--init-from", str(checkpoints["latte_text"]), "--layout", LATTE_LAYOUT, "--data",
           str(data["videos"]), "--fsdp", "--batch-size", str(BATCH), "--steps", "2", "--ckpt-every", "2",
           "--log-every", "1", "--no-progress", "--device", "cpu", "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step_0000002").iterdir()) == [
        "ema", "model", "optimizer.pt", "rng_rank0.pt", "rng_rank1.pt", "trainer.json"]
    log = losses(run_dir)
    assert [r[0] for r in log] == [1, 2] and all(r[4].endswith("f") and r[1] > 0 for r in log)
    final = load_model(run_dir / "model")  # full (unsharded) weights, loadable in one process
    assert type(final) is SparseLatte
    start = sparsify_latte(load_model(checkpoints["latte_text"]), LATTE_LAYOUT).state_dict()
    trained = load_model(run_dir / "checkpoints" / "step_0000002" / "model").state_dict()
    assert start.keys() == trained.keys() and any(not torch.equal(start[k], trained[k]) for k in start)
