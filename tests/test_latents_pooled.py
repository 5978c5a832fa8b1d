"""Latents directories for the flow-matching families (SD3 / SD3.5, FLUX.1): pooled text vectors beside the captions,
the VAE's shift_factor, the checks that a model and such a directory fit, and tiny SD3 / FLUX runs on them (Trainer
and `sparsedit train`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import helpers
from helpers import one_line
from sparsedit import load_model, save_model
from sparsedit.cli import main
from sparsedit.errors import SparseditError
from sparsedit.families.flux.model import Flux, FluxConfig
from sparsedit.families.flux.sparse import SparseFlux
from sparsedit.families.pixart.model import PixArt, PixArtConfig
from sparsedit.families.sd3.model import SD3, SD3Config
from sparsedit.train import Trainer, TrainSettings, check_model_fits_data, open_dataset
from sparsedit.train.data import LatentsDataset, save_latents
from sparsedit.train.datasets import describe_latents

pytestmark = pytest.mark.usefixtures("single_thread")

N, C, SIZE, L, D, P = 4, 4, 16, 3, 16, 8  # items, latent channels, latent side, caption tokens / width, pooled width
FLUX_META = {"scale_factor": 0.3611, "shift_factor": 0.1159, "vae": "black-forest-labs/FLUX.1-dev", "resolution": 128}
SD_META = {"scale_factor": 0.18215, "vae": "stabilityai/sd-vae-ft-ema", "resolution": 128}
LAYOUT = "0,1,1,1,1,0,1"  # a valid layout of the tiny FLUX (2 double + 2 single blocks)


def arrays(seed: int = 0) -> dict[str, torch.Tensor]:
    """Latents, captions (fp16), pooled vectors (fp16) and the empty prompt's caption / pooled vector."""
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(N, C, SIZE, SIZE, generator=g), "captions": torch.randn(N, L, D, generator=g).half(),
            "pooled": torch.randn(N, P, generator=g).half(), "null_caption": torch.randn(L, D, generator=g),
            "null_pooled": torch.randn(P, generator=g)}


def write(directory: Path, meta: dict[str, Any] = FLUX_META, null: bool = True, **over: Any) -> dict[str, torch.Tensor]:
    """A latents directory with pooled vectors (and, with ``null``, the empty prompt's); returns its arrays."""
    a = arrays()
    kw = {"captions": a["captions"], "pooled": a["pooled"]}
    if null:
        kw.update(null_caption=a["null_caption"], null_pooled=a["null_pooled"])
    save_latents(directory, a["latents"], None, meta, kind="latents", **{**kw, **over})
    return a


def tiny_flux() -> Flux:
    cfg = FluxConfig(input_size=SIZE, in_channels=C, hidden_size=32, depth_double=2, depth_single=2, num_heads=2,
                     axes_dims_rope=(4, 6, 6), caption_channels=D, pooled_channels=P, max_sequence_length=L)
    return helpers.randomize(Flux(cfg), 0.1)


def tiny_sd3(pooled: int = P, caption: int = D) -> SD3:
    cfg = SD3Config(input_size=SIZE, hidden_size=32, depth=4, num_heads=2, in_channels=C, caption_channels=caption,
                    pooled_channels=pooled, pos_embed_max_size=8)
    return helpers.randomize(SD3(cfg), 0.1)


def tiny_pixart() -> PixArt:
    return PixArt(PixArtConfig(input_size=SIZE, patch_size=2, in_channels=C, hidden_size=32, depth=2, num_heads=2,
                               caption_channels=D, null_caption_length=L))


# ------------------------------------------------------------------------------------------------
# the format: pooled vectors and shift_factor
# ------------------------------------------------------------------------------------------------


def test_pooled_vectors_round_trip_as_pooled_projections(tmp_path: Path) -> None:
    a = write(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["pooled_dim"] == P and meta["caption_shape"] == [L, D] and meta["shift_factor"] == 0.1159
    ds = LatentsDataset(tmp_path / "d")
    assert ds.pooled_dim == P and ds.null_pooled is not None and ds.null_pooled.dtype == torch.float32
    assert torch.equal(ds.null_pooled, a["null_pooled"]) and torch.equal(ds.null_caption, a["null_caption"])
    for i in range(N):
        x, cond = ds[i]
        assert sorted(cond) == ["encoder_attention_mask", "encoder_hidden_states", "pooled_projections"]
        assert cond["pooled_projections"].dtype == torch.float32 and cond["pooled_projections"].shape == (P,)
        assert torch.equal(cond["pooled_projections"], a["pooled"][i].float())
        assert torch.equal(cond["encoder_hidden_states"], a["captions"][i].float()) and torch.equal(x, a["latents"][i])
    _, batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=N)))
    assert torch.equal(batch["pooled_projections"], a["pooled"].float())
    # float32 pooled vectors are stored as given; without a null prompt there is neither null vector.
    pooled32 = torch.randn(N, P)
    write(tmp_path / "f32", null=False, pooled=pooled32)
    plain = LatentsDataset(tmp_path / "f32")
    assert plain.null_pooled is None and plain.null_caption is None and torch.equal(plain[2][1]["pooled_projections"],
                                                                                    pooled32[2])
    # A directory without pooled vectors reads as before: no pooled attributes, no pooled key, no pooled_dim.
    save_latents(tmp_path / "old", a["latents"], None, SD_META, kind="latents", captions=a["captions"])
    old = LatentsDataset(tmp_path / "old")
    assert old.pooled_dim is None and old.null_pooled is None and "pooled_projections" not in old[0][1]
    assert "pooled_dim" not in json.loads((tmp_path / "old" / "meta.json").read_text())
    assert "pooled_dim" not in describe_latents(old) and "null_pooled" not in describe_latents(old)
    assert describe_latents(ds)["pooled_dim"] == P and describe_latents(ds)["null_pooled"] is True
    assert describe_latents(plain)["null_pooled"] is False


def test_shift_factor_is_subtracted_before_scaling(tmp_path: Path) -> None:
    a = write(tmp_path / "d")
    ds = LatentsDataset(tmp_path / "d", apply_scale_factor=True)
    assert ds.shift_factor == 0.1159 and ds.scale_factor == 0.3611
    for i in range(N):
        by_hand = ((a["latents"][i].double() - 0.1159) * 0.3611).float()  # diffusers' SD3 / FLUX training scripts
        torch.testing.assert_close(ds[i][0], by_hand, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(ds[i][0], a["latents"][i] * 0.3611, atol=1e-3)  # the shift is really applied
    assert torch.equal(LatentsDataset(tmp_path / "d")[1][0], a["latents"][1])  # unscaled: no shift either
    # Moments: the shift applies to the posterior sample (logvar -30 leaves the mean, std 3e-7).
    moments = torch.cat([a["latents"], torch.full_like(a["latents"], -30.0)], dim=1)
    save_latents(tmp_path / "m", moments, None, FLUX_META, captions=a["captions"], pooled=a["pooled"])
    sample = LatentsDataset(tmp_path / "m", apply_scale_factor=True)[3][0]
    torch.testing.assert_close(sample, (a["latents"][3] - 0.1159) * 0.3611, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift", ["absent", None])
def test_no_shift_factor_reads_bit_identically_to_before(tmp_path: Path, shift: str | None) -> None:
    """No shift_factor (or diffusers' null for VAEs without one) means x * scale_factor, bit for bit."""
    meta = dict(SD_META) if shift == "absent" else {**SD_META, "shift_factor": None}
    lat = torch.randn(N, C, SIZE, SIZE).half()
    save_latents(tmp_path / "d", lat, torch.arange(N), meta, kind="latents")
    ds = LatentsDataset(tmp_path / "d", apply_scale_factor=True)
    assert ds.shift_factor == 0.0
    for i in range(N):
        assert torch.equal(ds[i][0], lat[i].float() * 0.18215)


# ------------------------------------------------------------------------------------------------
# refusals: save_latents, LatentsDataset
# ------------------------------------------------------------------------------------------------


def test_save_latents_refuses_bad_pooled_vectors_and_shift_factors(tmp_path: Path) -> None:
    a = arrays()
    cap, pooled, null_cap, null_pooled = a["captions"], a["pooled"], a["null_caption"], a["null_pooled"]
    cases = [
        (dict(labels=torch.arange(N), pooled=pooled), SD_META, ("pooled was given without captions", "captions too")),
        (dict(captions=cap, null_pooled=null_pooled), SD_META, ("null_pooled was given without pooled", "pooled=")),
        (dict(captions=cap, pooled=pooled.double()), SD_META, ("pooled must be a float16/float32 tensor (N=4, P)",
                                                               "float64", "cast")),
        (dict(captions=cap, pooled=pooled[:, None]), SD_META, ("pooled must be a float16/float32 tensor", "(4, 1, 8)")),
        (dict(captions=cap, pooled=pooled[:3]), SD_META, ("pooled holds 3 rows for 4 latents", "one pooled vector")),
        (dict(captions=cap, pooled=pooled.tolist()), SD_META, ("pooled must be a float16/float32 tensor", "list")),
        (dict(captions=cap, pooled=pooled, null_pooled=null_pooled), SD_META,
         ("null_pooled was given without null_caption", "null_caption=")),
        (dict(captions=cap, pooled=pooled, null_caption=null_cap), SD_META,
         ("null_caption was given with pooled vectors but no null_pooled", "null_pooled=")),
        (dict(captions=cap, pooled=pooled, null_caption=null_cap, null_pooled=torch.zeros(P + 1)), SD_META,
         ("null_pooled has shape (9,) but the pooled vectors are (8,)", "same text encoders")),
        (dict(captions=cap, pooled=pooled, null_caption=null_cap, null_pooled=torch.zeros(1, P)), SD_META,
         ("null_pooled must be a float16/float32 tensor (P=8,)", "(1, 8)")),
        (dict(captions=cap), {**SD_META, "shift_factor": "0.0609"}, ("shift_factor in meta must be a finite number",
                                                                      "'0.0609'", "leave it out")),
        (dict(captions=cap), {**SD_META, "shift_factor": True}, ("shift_factor in meta must be a finite number",)),
        (dict(captions=cap), {**SD_META, "shift_factor": math.inf}, ("shift_factor in meta must be a finite number",)),
    ]
    for kw, meta, words in cases:
        with pytest.raises(SparseditError) as err:
            save_latents(tmp_path, a["latents"], kw.pop("labels", None), meta, kind="latents", **kw)
        one_line(err, *words)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def rewrite(directory: Path, **tensors: torch.Tensor) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "latents.safetensors"))


def test_latents_dataset_refuses_pooled_vectors_that_do_not_fit(tmp_path: Path) -> None:
    d = tmp_path / "d"
    a = write(d, meta=SD_META, null=False)
    lat, cap, mask = a["latents"], a["captions"], torch.ones(N, L, dtype=torch.long)
    text = {"latents": lat, "captions": cap, "caption_mask": mask}
    cases = [
        ({"latents": lat, "labels": torch.arange(N), "pooled": a["pooled"]}, ("holds pooled without 'pooled' and "
                                                                              "'captions'", "save_latents")),
        ({**text, "null_pooled": a["null_pooled"]}, ("holds null_pooled without 'pooled'",)),
        ({**text, "pooled": torch.zeros(N + 1, P)}, ("pooled vectors in", "'pooled' [5, 8]", "rewrite it")),
        ({**text, "pooled": torch.zeros(N * P)}, ("'pooled' [32]",)),
        ({**text, "pooled": torch.zeros(N, P, dtype=torch.long)}, ("'pooled' [4, 8]", "expected (N, P) float")),
        ({**text, "null_caption": a["null_caption"], "pooled": a["pooled"],
          "null_pooled": torch.zeros(P - 1)}, ("'null_pooled' [7] (with 'null_caption')",)),
        ({**text, "pooled": a["pooled"], "null_pooled": a["null_pooled"]}, ("'null_pooled' [8] (without "
                                                                             "'null_caption')",)),
        ({**text, "null_caption": a["null_caption"], "pooled": a["pooled"]}, ("'null_pooled' None (with "
                                                                              "'null_caption')",)),
    ]
    for tensors, words in cases:
        rewrite(d, **tensors)
        with pytest.raises(SparseditError) as err:
            LatentsDataset(d)
        one_line(err, *words)
    rewrite(d, **text, pooled=a["pooled"])
    assert LatentsDataset(d).pooled_dim == P  # the directory itself is fine again
    meta_path = d / "meta.json"
    meta = json.loads(meta_path.read_text())
    for change, words in [({"pooled_dim": P + 2}, ("says pooled_dim 10 but", "8-wide pooled vectors")),
                          ({"shift_factor": "0.1159"}, ("shift_factor in", "meta.json", "must be a finite number")),
                          ({"shift_factor": [0.1]}, ("must be a finite number, got [0.1]",))]:
        meta_path.write_text(json.dumps({**meta, **change}))
        with pytest.raises(SparseditError) as err:
            LatentsDataset(d)
        one_line(err, *words)
    rewrite(d, **text)  # pooled_dim in meta.json but no pooled vectors in the file
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SparseditError) as err:
        LatentsDataset(d)
    one_line(err, "says pooled_dim 8 but", "holds no pooled vectors")


# ------------------------------------------------------------------------------------------------
# does the model fit the data
# ------------------------------------------------------------------------------------------------


def test_models_with_and_without_pooled_channels_are_matched_to_the_data(tmp_path: Path) -> None:
    write(tmp_path / "pooled")
    a = arrays()
    save_latents(tmp_path / "plain", a["latents"], None, FLUX_META, kind="latents", captions=a["captions"])
    pooled = describe_latents(LatentsDataset(tmp_path / "pooled"))
    plain = describe_latents(LatentsDataset(tmp_path / "plain"))
    for model in (tiny_sd3(), tiny_flux()):
        check_model_fits_data(model.config, pooled)  # fits
        with pytest.raises(SparseditError) as err:
            check_model_fits_data(model.config, plain)
        name = model.config.model_type
        one_line(err, f"this {name} takes a {P}-wide pooled text vector beside the caption",
                 "save_latents(..., pooled=...)")
    with pytest.raises(SparseditError) as err:
        check_model_fits_data(tiny_sd3(pooled=P + 4).config, pooled)
    msg = one_line(err, f"pooled text vector width {P + 4} vs {P} in the data")
    assert "caption width" not in msg
    with pytest.raises(SparseditError) as err:  # the caption width check stays, beside the pooled one
        check_model_fits_data(tiny_sd3(pooled=P + 4, caption=D + 1).config, pooled)
    one_line(err, f"caption width {D + 1} vs {D} in the data", f"pooled text vector width {P + 4} vs {P}")
    with pytest.raises(SparseditError) as err:
        check_model_fits_data(tiny_sd3(caption=D + 1).config, pooled)
    assert "pooled" not in one_line(err, f"caption width {D + 1} vs {D}")
    # A model without pooled_channels would silently ignore the vectors: refused, and through the Trainer too.
    pixart = tiny_pixart()
    check_model_fits_data(pixart.config, plain)
    with pytest.raises(SparseditError) as err:
        check_model_fits_data(pixart.config, pooled)
    one_line(err, f"this PixArt takes no pooled text vector but the data holds {P}-wide ones", "ignore")
    ds, _ = open_dataset(str(tmp_path / "pooled"))
    with pytest.raises(SparseditError) as err:
        Trainer(pixart, ds, tmp_path / "run", TrainSettings(steps=1, batch_size=2), progress=False, device="cpu")
    one_line(err, "takes no pooled text vector")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# training on such a directory
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["FLUX", "SD3"])
def test_a_tiny_model_trains_on_pooled_latents(tmp_path: Path, family: str) -> None:
    """Two Trainer steps on a directory read as `sparsedit train --data` reads it: the model's inputs are the shifted
    and scaled latents and the stored pooled vectors, in the trainer's batch order."""
    a = write(tmp_path / "d", meta=FLUX_META if family == "FLUX" else {**FLUX_META, "scale_factor": 1.5305,
                                                                          "shift_factor": 0.0609})
    scale, shift = (0.3611, 0.1159) if family == "FLUX" else (1.5305, 0.0609)
    ds, info = open_dataset(str(tmp_path / "d"))
    assert info["pooled_dim"] == P and info["null_pooled"] is True
    model = tiny_flux() if family == "FLUX" else tiny_sd3()
    trainer = Trainer(model, ds, tmp_path / "run", TrainSettings(steps=2, batch_size=2, log_every=1, ckpt_every=2),
                      progress=False, device="cpu")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    losses = trainer.diffusion.training_losses

    def spy(model_fn: Any, x0: torch.Tensor, t: torch.Tensor, kwargs: dict, *args: Any, **kw: Any) -> dict:
        seen.append((x0.clone(), kwargs["pooled_projections"].clone()))
        return losses(model_fn, x0, t, kwargs, *args, **kw)

    trainer.diffusion.training_losses = spy
    trainer.fit()
    order = torch.randperm(N, generator=torch.Generator().manual_seed(0))  # epoch 0 of seed 0
    assert len(seen) == 2
    for step, (x0, pooled) in enumerate(seen):
        idx = order[2 * step : 2 * step + 2]
        torch.testing.assert_close(x0, (a["latents"][idx].double() - shift).mul(scale).float(), rtol=1e-6, atol=1e-6)
        assert torch.equal(pooled, a["pooled"][idx].float())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert type(load_model(tmp_path / "run" / "model")) is type(model)


def cli_train(flux_dir: Path, data: Path, run_dir: Path, *extra: str) -> int:
    return main(["train", "--init-from", str(flux_dir), "--layout", LAYOUT, "--data", str(data), "--steps", "2",
                 "--batch-size", "2", "--run-dir", str(run_dir), "--log-every", "1", "--no-progress", "--device", "cpu",
                 *extra])


def test_the_cli_fine_tunes_a_sparse_flux_on_pooled_latents(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    flux_dir = save_model(tiny_flux(), tmp_path / "flux")
    write(tmp_path / "d")
    run_dir = tmp_path / "run"
    assert cli_train(flux_dir, tmp_path / "d", run_dir, "--recipe", "paper") == 0
    final = load_model(run_dir / "model")
    assert type(final) is SparseFlux and final.config.layout.as_string() == LAYOUT
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["grid"] != "dense" and math.isfinite(r["loss"]) for r in rows)
    info = json.loads((run_dir / "run.json").read_text())["data"]
    assert info["pooled_dim"] == P and info["caption_shape"] == [L, D]
    # The same directory without pooled vectors is refused before anything is trained.
    a = arrays()
    save_latents(tmp_path / "plain", a["latents"], None, FLUX_META, kind="latents", captions=a["captions"])
    capsys.readouterr()
    assert cli_train(flux_dir, tmp_path / "plain", tmp_path / "run2", "--recipe", "paper") == 2
    err = capsys.readouterr().err
    assert f"this SparseFLUX takes a {P}-wide pooled text vector beside the caption" in err and not (tmp_path / "run2").exists()


def test_the_cli_default_recipe_fine_tunes_a_sparse_flux(tmp_path: Path) -> None:
    flux_dir = save_model(tiny_flux(), tmp_path / "flux")
    write(tmp_path / "d")
    assert cli_train(flux_dir, tmp_path / "d", tmp_path / "run") == 0
