"""Training a flow-matching family (SD3 / SparseSD3, FLUX / SparseFLUX) with the trainer: the rectified-flow loss the trainer logs is the
loss of a direct model call, sparse batches share one token grid, and missing inputs are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

import helpers
from sparsedit.diffusion.flow import FlowProcess
from sparsedit.errors import SparseditError
from sparsedit.families.flux import Flux, FluxConfig, sparsify_flux
from sparsedit.families.sd3 import SD3, SD3Config, sparsify_sd3
from sparsedit.train import Trainer, TrainSettings

pytestmark = pytest.mark.usefixtures("single_thread")

CAPTION, POOLED, TOKENS, N = 16, 8, 3, 8


class CaptionLatents(Dataset):
    """(latent, {caption, pooled vector}) items, as a user's own data set would give them."""

    def __init__(self, pooled: bool = True):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 4, 16, 16, generator=g)
        self.caption = torch.randn(N, TOKENS, CAPTION, generator=g)
        self.pooled = torch.randn(N, POOLED, generator=g) if pooled else None

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        cond: dict[str, Any] = {"encoder_hidden_states": self.caption[i]}
        if self.pooled is not None:
            cond["pooled_projections"] = self.pooled[i]
        return self.x[i], cond


def tiny_sd3() -> SD3:
    cfg = SD3Config(input_size=16, hidden_size=32, depth=4, num_heads=2, in_channels=4, caption_channels=CAPTION,
                    pooled_channels=POOLED, pos_embed_max_size=8)
    return helpers.randomize(SD3(cfg), 0.1)


def settings(**kw: Any) -> TrainSettings:
    return TrainSettings(**{"steps": 1, "batch_size": 4, "lr": 1e-3, "log_every": 1, "ckpt_every": 100, **kw})


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_logged_loss_is_the_flow_loss_of_a_direct_call(tmp_path: Path) -> None:
    model = tiny_sd3()
    twin = SD3(model.config)
    twin.load_state_dict(model.state_dict())
    ds = CaptionLatents()
    Trainer(model, ds, tmp_path / "run", settings(), progress=False, device="cpu").fit()
    first = logged(tmp_path / "run")[0]
    assert first["vb"] == 0.0 and first["loss"] > 0

    # Step 1 by hand, drawn as docs/training.md describes: epoch 0's order, then t and the noise from rank 0's
    # generator (seed * 1000); SD3 drops no captions (no class_dropout_prob), so nothing else is random.
    order = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:4]
    items = [ds[int(i)] for i in order]
    x = torch.stack([item[0] for item in items])
    cond = {k: torch.stack([item[1][k] for item in items]) for k in items[0][1]}
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (4,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    out = FlowProcess().training_losses(twin.train(), x, t, cond, noise)
    assert first["mse"] == pytest.approx(out["mse"].mean().item(), rel=1e-5)
    assert first["loss"] == pytest.approx(out["loss"].mean().item(), rel=1e-5)


def test_a_sparse_sd3_trains_one_grid_per_batch(tmp_path: Path) -> None:
    sparse = sparsify_sd3(tiny_sd3(), "0,1,1,1,1,0,1").train()
    Trainer(sparse, CaptionLatents(), tmp_path / "run", settings(steps=6), progress=False, device="cpu").fit()
    rows = logged(tmp_path / "run")
    assert len(rows) == 6 and all(r["grid"] != "dense" for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_refusals_name_the_missing_input_and_the_wrong_weighting(tmp_path: Path) -> None:
    with pytest.raises(SparseditError) as err:
        Trainer(tiny_sd3(), CaptionLatents(pooled=False), tmp_path / "a", settings(), progress=False,
                device="cpu").fit()
    helpers.one_line(err, "pooled_projections")
    with pytest.raises(SparseditError) as err:
        Trainer(tiny_sd3(), CaptionLatents(), tmp_path / "b", settings(min_snr_gamma=5.0), progress=False,
                device="cpu").fit()
    helpers.one_line(err, "Min-SNR")


def test_a_sparse_flux_dev_trains_with_its_guidance_input(tmp_path: Path) -> None:
    dense = tiny_flux()
    sparse = sparsify_flux(dense, "0,1,1,1,1,0,1").train()
    seen = []
    sparse.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs.get("guidance")), with_kwargs=True)
    Trainer(sparse, CaptionLatents(), tmp_path / "run", settings(steps=3), progress=False, device="cpu").fit()
    rows = logged(tmp_path / "run")
    assert len(rows) == 3 and all(r["grid"] != "dense" for r in rows) and rows[0]["vb"] == 0.0
    assert seen and all(g is not None and torch.all(g == 3.5) for g in seen)  # FluxPipeline's default guidance


def tiny_flux() -> Flux:
    cfg = FluxConfig(input_size=16, in_channels=4, hidden_size=32, depth_double=2, depth_single=2, num_heads=2,
                     axes_dims_rope=(4, 6, 6), caption_channels=CAPTION, pooled_channels=POOLED, guidance_embeds=True,
                     max_sequence_length=TOKENS)
    return helpers.randomize(Flux(cfg), 0.1)


@pytest.mark.parametrize("name", ["SD3", "SparseSD3", "FLUX", "SparseFLUX"])
def test_gradient_checkpointing_recomputes_every_block_and_keeps_the_gradients(name: str) -> None:
    """--grad-checkpointing on the flow families: each block's forward runs again in the backward pass (the memory is
    really traded), and the gradients equal those without it."""
    model = tiny_sd3() if "SD3" in name else tiny_flux()
    if name.startswith("Sparse"):
        model = (sparsify_sd3 if "SD3" in name else sparsify_flux)(model, "0,1,1,1,1,0,1")
    model.train()
    g = torch.Generator().manual_seed(1)
    x, caption, pooled = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, TOKENS, CAPTION, generator=g), \
        torch.randn(2, POOLED, generator=g)
    extra = (torch.full((2,), 3.5),) if "FLUX" in name else ()
    calls: list[int] = []
    for i, block in enumerate(model.blocks):  # counted in forward itself: a recomputation runs no forward hooks
        def counted(*args: Any, i: int = i, forward: Any = block.forward, **kwargs: Any) -> Any:
            calls.append(i)
            return forward(*args, **kwargs)

        block.forward = counted

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        calls.clear()
        model(x, torch.full((2,), 700.0), caption, pooled, *extra).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_calls = grads(False), len(calls)
    checked, checked_calls = grads(True), len(calls)
    assert plain_calls == len(model.blocks) and checked_calls == 2 * len(model.blocks)
    assert plain.keys() == checked.keys() and len(plain) == sum(1 for _ in model.parameters())
    for n in plain:
        torch.testing.assert_close(checked[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)


def test_bf16_autocast_trains_a_sparse_flux(tmp_path: Path) -> None:
    """--precision bf16 (autocast, fp32 master weights) on a SparseFLUX: the block matmuls run in bf16, the loss is
    finite and close to the fp32 run's first loss."""
    dtypes: set[torch.dtype] = set()
    losses = {}
    for precision in ("fp32", "bf16"):
        sparse = sparsify_flux(tiny_flux(), "0,1,1,1,1,0,1").train()
        hook = sparse.blocks[1].register_forward_hook(
            lambda m, args, out, p=precision: dtypes.add(out[0].dtype) if p == "bf16" else None)
        Trainer(sparse, CaptionLatents(), tmp_path / precision, settings(steps=1, precision=precision), progress=False,
                device="cpu").fit()
        hook.remove()
        losses[precision] = logged(tmp_path / precision)[0]["loss"]
        assert all(p.dtype == torch.float32 for p in sparse.parameters())  # master weights stay fp32
    assert dtypes == {torch.bfloat16}
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05) and losses["bf16"] != losses["fp32"]
