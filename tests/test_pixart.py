"""Tests for PixArt-alpha / SparsePixArt: diffusers parity, original ``.pth`` loading, sparsification,
checkpoints, guidance/generation and analytic FLOPs.

The reference is diffusers' own ``PixArtTransformer2DModel`` built from tiny configs with every
parameter re-randomised (N(0, 0.2^2)), so zero-initialised layers cannot hide mapping errors. The
original-format files are written from the diffusers model by an inverse key map written here,
independently of :mod:`sparsedit.families.pixart.convert`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import sparsedit
from helpers import randomize
from sparsedit.core.checkpoint import save_pretrained
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.eval.flops import (
    measure_macs,
    model_params,
    pixart_macs,
    schedule_macs,
    sparse_pixart_macs,
)
from sparsedit.families.pixart.convert import original_state_dict, save_pixart_diffusers
from sparsedit.families.pixart.layers import PixArtBlock
from sparsedit.families.pixart.model import PixArt, PixArtConfig, pixart_config
from sparsedit.families.pixart.sampling import generate_pixart
from sparsedit.families.pixart.sparse import (
    PixArtGenerationBlock,
    PixArtPoolingformer,
    PixArtRecoveryBlock,
    SparsePixArt,
    SparsePixArtConfig,
    sparsify_pixart,
)

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
HEADS, HEAD_DIM = 2, 72  # PixArt's head size, so the .pth loader infers the head count
HIDDEN = HEADS * HEAD_DIM
CAPTION = 32  # stand-in for T5's 4096 channels
TOKENS = 7
DEPTH = 2
LATENT = 8  # 4 x 4 token grid at patch 2


pytestmark = pytest.mark.usefixtures("single_thread")


def diffusers_model(additional: bool, interpolation_scale: float | None = 0.5, depth: int = DEPTH,
                    sample_size: int = LATENT) -> nn.Module:
    ref = diffusers.PixArtTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=depth,
        cross_attention_dim=HIDDEN, sample_size=sample_size, patch_size=2, caption_channels=CAPTION,
        use_additional_conditions=additional, interpolation_scale=interpolation_scale,
    )
    return randomize(ref).eval()


def inputs(batch: int = 3, size: tuple[int, int] = (LATENT, LATENT)) -> dict[str, Tensor]:
    mask = torch.ones(batch, TOKENS)
    mask[0, 4:] = 0  # padded caption
    if batch > 1:
        mask[1, 1:] = 0  # a single real token
    return {
        "x": torch.randn(batch, 4, *size), "t": torch.tensor([999, 500, 3, 250][:batch]),
        "y": torch.randn(batch, TOKENS, CAPTION), "mask": mask,
        "sizes": {"resolution": torch.tensor([[64.0, 64.0], [64.0, 96.0], [32.0, 64.0], [64.0, 64.0]][:batch]),
                  "aspect_ratio": torch.tensor([[1.0], [1.5], [2.0], [1.0]][:batch])},
    }


def ref_out(ref: nn.Module, inp: dict[str, Tensor], additional: bool, exact: bool = False) -> Tensor:
    """diffusers' output; ``exact`` passes padding as a -inf bias (exact exclusion, like the original)
    instead of letting diffusers turn the 0/1 mask into a -10000 bias, which std-0.2 random weights
    overpower (their text logits reach ~1e4)."""
    mask = inp["mask"]
    if exact:
        mask = torch.zeros_like(mask).masked_fill(mask == 0, float("-inf"))[:, None]  # (B, 1, L) bias
    with torch.no_grad():
        return ref(inp["x"], encoder_hidden_states=inp["y"], timestep=inp["t"], encoder_attention_mask=mask,
                   added_cond_kwargs=inp["sizes"] if additional else {"resolution": None, "aspect_ratio": None}).sample


def our_out(model: nn.Module, inp: dict[str, Tensor], additional: bool, **kw) -> Tensor:
    with torch.no_grad():
        return model(inp["x"], inp["t"], inp["y"], inp["mask"], inp["sizes"] if additional else None, **kw)


def max_err(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


def tiny_config(**kw) -> PixArtConfig:
    base = dict(input_size=LATENT, hidden_size=HIDDEN, depth=DEPTH, num_heads=HEADS, caption_channels=CAPTION,
                null_caption_length=TOKENS, interpolation_scale=0.5)
    base.update(kw)
    return PixArtConfig(**base)


# ------------------------------------------------------------------------------------------------
# independent inverse key map: diffusers -> original PixArt .pth
# ------------------------------------------------------------------------------------------------


def original_from_diffusers(ref: nn.Module, null_caption: Tensor) -> dict[str, Tensor]:
    sd = ref.state_dict()
    out: dict[str, Tensor] = {}

    def put(orig: str, diff: str) -> None:
        for s in ("weight", "bias"):
            out[f"{orig}.{s}"] = sd.pop(f"{diff}.{s}")

    put("x_embedder.proj", "pos_embed.proj")
    put("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1")
    put("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2")
    put("t_block.1", "adaln_single.linear")
    put("y_embedder.y_proj.fc1", "caption_projection.linear_1")
    put("y_embedder.y_proj.fc2", "caption_projection.linear_2")
    put("final_layer.linear", "proj_out")
    if "adaln_single.emb.resolution_embedder.linear_1.weight" in sd:
        put("csize_embedder.mlp.0", "adaln_single.emb.resolution_embedder.linear_1")
        put("csize_embedder.mlp.2", "adaln_single.emb.resolution_embedder.linear_2")
        put("ar_embedder.mlp.0", "adaln_single.emb.aspect_ratio_embedder.linear_1")
        put("ar_embedder.mlp.2", "adaln_single.emb.aspect_ratio_embedder.linear_2")
    out["final_layer.scale_shift_table"] = sd.pop("scale_shift_table")
    i = 0
    while f"transformer_blocks.{i}.scale_shift_table" in sd:
        b = f"transformer_blocks.{i}."
        for s in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{s}"] = torch.cat([sd.pop(f"{b}attn1.to_{n}.{s}") for n in "qkv"])
            out[f"blocks.{i}.cross_attn.kv_linear.{s}"] = torch.cat([sd.pop(f"{b}attn2.to_{n}.{s}") for n in "kv"])
        put(f"blocks.{i}.attn.proj", f"{b}attn1.to_out.0")
        put(f"blocks.{i}.cross_attn.q_linear", f"{b}attn2.to_q")
        put(f"blocks.{i}.cross_attn.proj", f"{b}attn2.to_out.0")
        put(f"blocks.{i}.mlp.fc1", f"{b}ff.net.0.proj")
        put(f"blocks.{i}.mlp.fc2", f"{b}ff.net.2")
        out[f"blocks.{i}.scale_shift_table"] = sd.pop(f"{b}scale_shift_table")
        i += 1
    assert not sd, f"inverse map left diffusers keys: {sorted(sd)}"
    # The stored position table, as diffusers (and the original) compute it.
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    pe = ref.pos_embed
    table = get_2d_sincos_pos_embed(HIDDEN, pe.height, base_size=pe.base_size,
                                    interpolation_scale=pe.interpolation_scale, output_type="pt")
    out["pos_embed"] = table.float()[None]
    out["y_embedder.y_embedding"] = null_caption
    return out


# ------------------------------------------------------------------------------------------------
# parity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("additional", [False, True])
def test_diffusers_parity(tmp_path: Path, additional: bool) -> None:
    ref = diffusers_model(additional)
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    model = sparsedit.load_model(tmp_path / "pipe")  # the pipeline directory resolves to transformer/
    assert type(model) is PixArt
    assert model.config.use_additional_conditions is additional
    assert model.config.interpolation_scale == 0.5
    assert model.config.text_mask_bias == -10000.0  # diffusers' mask conversion, kept for exact parity
    inp = inputs()
    err = max_err(our_out(model, inp, additional), ref_out(ref, inp, additional))
    assert err < TOL
    # A non-square latent: the position table is recomputed on the fly by both.
    inp = inputs(2, (LATENT, LATENT + 4))
    assert max_err(our_out(model, inp, additional), ref_out(ref, inp, additional)) < TOL


def test_diffusers_default_interpolation_scale(tmp_path: Path) -> None:
    """A null interpolation_scale means max(sample_size // 64, 1) in diffusers (1 here, not 0.5)."""
    ref = diffusers_model(False, interpolation_scale=None)
    ref.save_pretrained(tmp_path / "d")
    model = sparsedit.load_model(tmp_path / "d")
    assert model.config.interpolation_scale == 1.0
    inp = inputs()
    assert max_err(our_out(model, inp, False), ref_out(ref, inp, False)) < TOL


@pytest.mark.parametrize("additional", [False, True])
def test_original_pth_matches_diffusers(tmp_path: Path, additional: bool) -> None:
    ref = diffusers_model(additional)
    null = torch.randn(TOKENS, CAPTION)
    path = tmp_path / "PixArt-XL-2-tiny.pth"
    torch.save({"state_dict": original_from_diffusers(ref, null)}, path)
    assert sparsedit.loading.detect_format(path) == "official"
    model = sparsedit.load_model(path)
    assert type(model) is PixArt
    cfg = model.config
    assert (cfg.num_heads, cfg.depth, cfg.interpolation_scale, cfg.null_caption_length) == (HEADS, DEPTH, 0.5, TOKENS)
    assert cfg.use_additional_conditions is additional
    assert torch.equal(model.y_embedder.y_embedding, null)
    assert cfg.text_mask_bias is None  # the original excludes padding exactly
    inp = inputs()
    assert max_err(our_out(model, inp, additional), ref_out(ref, inp, additional, exact=True)) < TOL
    # Our own writer of the original layout round-trips too.
    torch.save({"state_dict": original_state_dict(model)}, tmp_path / "again.pth")
    again = sparsedit.load_model(tmp_path / "again.pth")
    assert max_err(our_out(again, inp, additional), our_out(model, inp, additional)) == 0


def test_every_key_consumed(tmp_path: Path) -> None:
    ref = diffusers_model(False)
    state = original_from_diffusers(ref, torch.randn(TOKENS, CAPTION))
    state["blocks.0.cross_attn.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.cross_attn\.extra\.weight"):
        sparsedit.load_model(tmp_path / "extra.pth")
    del state["blocks.0.cross_attn.extra.weight"], state["blocks.1.cross_attn.proj.bias"]
    torch.save({"state_dict": state}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.cross_attn\.proj\.bias"):
        sparsedit.load_model(tmp_path / "missing.pth")
    # diffusers directory with a stray tensor
    from safetensors.torch import load_file, save_file

    ref.save_pretrained(tmp_path / "d")
    weights = tmp_path / "d" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["transformer_blocks.0.attn2.norm_q.weight"] = torch.ones(3)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.attn2\.norm_q\.weight"):
        sparsedit.load_model(tmp_path / "d")


def test_wrong_pos_embed_is_refused(tmp_path: Path) -> None:
    state = original_from_diffusers(diffusers_model(False), torch.randn(TOKENS, CAPTION))
    state["pos_embed"] = state["pos_embed"] * 0.5
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="pos_embed"):
        sparsedit.load_model(tmp_path / "bad.pth")


@pytest.mark.parametrize("additional", [False, True])
def test_diffusers_export_round_trip(tmp_path: Path, additional: bool) -> None:
    model = randomize(PixArt(tiny_config(use_additional_conditions=additional, text_mask_bias=-10000.0))).eval()
    with pytest.raises(SparseditError, match="null caption"):
        save_pixart_diffusers(model, tmp_path / "d")
    save_pixart_diffusers(model, tmp_path / "d", drop_null_caption=True)
    ref = diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / "d").eval()
    inp = inputs()
    assert max_err(our_out(model, inp, additional), ref_out(ref, inp, additional)) < TOL


def test_text_mask_matters_and_all_padding_is_uniform() -> None:
    model = randomize(PixArt(tiny_config())).eval()
    inp = inputs()
    full = our_out(model, {**inp, "mask": torch.ones(3, TOKENS)}, False)
    assert max_err(our_out(model, inp, False)[0], full[0]) > 1e-3
    # A row with no real token attends to all tokens (diffusers' -10000 bias does the same).
    none = our_out(model, {**inp, "mask": torch.zeros(3, TOKENS)}, False)
    assert max_err(none, full) < 1e-5


def test_original_4d_caption_and_batch_broadcast() -> None:
    model = randomize(PixArt(tiny_config())).eval()
    inp = inputs()
    with torch.no_grad():
        a = model(inp["x"], inp["t"], inp["y"], inp["mask"])
        b = model(inp["x"], inp["t"], inp["y"][:, None], inp["mask"])  # the original's (B, 1, L, C)
    assert torch.equal(a, b)
    with pytest.raises(SparseditError, match="T5 embeddings"):
        model(inp["x"], inp["t"], torch.randn(3, TOKENS, CAPTION + 1))
    with pytest.raises(SparseditError, match="size conditions"):
        PixArt(tiny_config(use_additional_conditions=True))(inp["x"], inp["t"], inp["y"])


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
def test_sparsedit_checkpoint_round_trip(tmp_path: Path, sparse: bool) -> None:
    model: nn.Module = randomize(PixArt(tiny_config(depth=4, use_additional_conditions=True))).eval()
    if sparse:
        model = sparsify_pixart(model, "1,1,1,0,1,0,1", r_min=0.3, r_max=0.8)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = sparsedit.load_model(tmp_path / "ckpt")  # no flags
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    inp = inputs()
    kw = {"grid": (2, 3)} if sparse else {}
    assert max_err(our_out(loaded, inp, True, **kw), our_out(model, inp, True, **kw)) == 0


# ------------------------------------------------------------------------------------------------
# SparsePixArt
# ------------------------------------------------------------------------------------------------


LAYOUT = "1,1,1,1,1,1,1"  # pool, (gen, sparse, recover, dense), top: depth 6


def sparse_model(**kw) -> SparsePixArt:
    dense = randomize(PixArt(tiny_config(depth=6, input_size=16, **kw))).eval()  # 8 x 8 token grid
    return sparsify_pixart(dense, LAYOUT, r_min=0.3, r_max=0.9)


def test_sparsify_initialisation() -> None:
    dense = randomize(PixArt(tiny_config(depth=6))).eval()
    sparse = sparsify_pixart(dense, LAYOUT, r_min=0.3, r_max=0.9)
    assert sparse.kinds == ["pool", "gen", "sparse", "recover", "dense", "top"]
    types = [type(b) for b in sparse.blocks]
    assert types[0] is PixArtPoolingformer and types[1] is PixArtGenerationBlock and types[3] is PixArtRecoveryBlock
    src, dst = dense.state_dict(), sparse.state_dict()
    d = HIDDEN
    assert torch.equal(dst["blocks.0.attn.v.weight"], src["blocks.0.attn.qkv.weight"][2 * d :])
    assert "blocks.0.attn.qkv.weight" not in dst
    assert torch.equal(dst["blocks.3.merge_sparse.weight"], torch.zeros(d, d))
    assert torch.equal(dst["blocks.3.merge_dense.weight"], torch.eye(d))
    for key in src:
        if key in dst:
            assert torch.equal(dst[key], src[key]), key
    assert sparse.config.layout.as_string() == LAYOUT
    with pytest.raises(SparseditError, match="dense PixArt"):
        sparsify_pixart(sparse, LAYOUT)
    with pytest.raises(SparseditError, match="layout"):
        sparsify_pixart(dense, "1,1,1,1,1,1,2")


def test_sparse_forward_grids_follow_schedule() -> None:
    model = sparse_model()
    counts: list[int] = []
    model.blocks[1].register_forward_hook(lambda m, a, out: counts.append(out.shape[1]))
    inp = inputs(2, (16, 16))
    sched = model.config.schedule
    for t in (999, 600, 100):
        tt = torch.full((2,), t)
        with torch.no_grad():
            out = model(inp["x"], tt, inp["y"][:2], inp["mask"][:2])
        assert out.shape == (2, 8, 16, 16)
        h, w = sched.grid(t, (8, 8))
        assert counts[-1] == h * w
    assert counts[0] < counts[-1]  # noisy steps keep fewer tokens
    with torch.no_grad():
        model(inp["x"], torch.tensor([999, 100]), inp["y"][:2], inp["mask"][:2], grid=(3, 5))
    assert counts[-1] == 15
    with pytest.raises(SparseditError, match="mixes timesteps"):
        model(inp["x"], torch.tensor([999, 100]), inp["y"][:2], inp["mask"][:2])


def test_generation_block_at_r0_equals_dense_block() -> None:
    block = randomize(PixArtBlock(HIDDEN, HEADS)).eval()
    gen = PixArtGenerationBlock(HIDDEN, HEADS).eval()
    gen.load_state_dict(block.state_dict())
    from sparsedit.families.pixart.layers import PixArtCond, text_attention_mask

    x = torch.randn(2, 16, HIDDEN)
    mask = torch.ones(2, TOKENS)
    mask[0, 3:] = 0
    c = PixArtCond(t0=torch.randn(2, 6 * HIDDEN), emb=torch.randn(2, HIDDEN), text=torch.randn(2, TOKENS, HIDDEN),
                   mask=text_attention_mask(mask, 2, TOKENS))
    with torch.no_grad():
        assert max_err(gen(None, c, x, (4, 4), (4, 4)), block(x, c)) < 1e-5
        sparse = gen(None, c, x, (4, 4), (2, 2))
    assert sparse.shape == (2, 4, HIDDEN)


def test_fresh_recovery_merge_is_dense_path() -> None:
    """W1 = 0, W2 = I: the merged tokens are the SDTM input plus the position table."""
    block = PixArtRecoveryBlock(HIDDEN, HEADS)
    x, xs, pos = torch.randn(2, 16, HIDDEN), torch.randn(2, 4, HIDDEN), torch.randn(1, 16, HIDDEN)
    merged = block.merge_sparse(xs.repeat(1, 4, 1)) + block.merge_dense(x) + pos
    assert torch.allclose(merged, x + pos)


def test_forward_with_cfg_uses_null_caption() -> None:
    model = randomize(PixArt(tiny_config())).eval()
    inp = inputs(2)
    x = torch.cat([inp["x"], inp["x"]])
    t = torch.tensor([500, 500, 500, 500])
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, inp["y"], 4.0, inp["mask"], cfg_mode="all")
        null = model.y_embedder.y_embedding[None].expand(2, -1, -1)
        both = model(x, t, torch.cat([inp["y"], null]), torch.cat([inp["mask"], inp["mask"]]))
    cond, uncond = both[:, :4].chunk(2)
    expect = uncond + 4.0 * (cond - uncond)
    assert max_err(guided[:2, :4], expect) < 1e-5 and torch.equal(guided[:2, :4], guided[2:, :4])
    assert torch.equal(guided[:, 4:], both[:, 4:])
    # Explicit null embeddings of another length are padded with masked tokens.
    with torch.no_grad():
        short = model.forward_with_cfg(x, t, inp["y"], 4.0, inp["mask"], null_embeds=torch.randn(1, 3, CAPTION))
    assert short.shape == x.shape[:1] + (8,) + x.shape[2:]
    diffusers_like = PixArt(tiny_config(null_caption_length=0))
    with pytest.raises(SparseditError, match="null caption"):
        diffusers_like.forward_with_cfg(x, t, inp["y"], 4.0)


@pytest.mark.parametrize("sparse", [False, True])
def test_generate_pixart(sparse: bool) -> None:
    model: nn.Module = sparse_model() if sparse else randomize(PixArt(tiny_config())).eval()
    inp = inputs(2)
    kw = dict(sampler="ddim", steps=3, cfg_scale=3.0, seed=1)
    a = generate_pixart(model, inp["y"][:2], inp["mask"][:2], **kw)
    b = generate_pixart(model, inp["y"][:2], inp["mask"][:2], **kw)
    size = 16 if sparse else LATENT
    assert a.shape == (2, 4, size, size) and torch.equal(a, b) and torch.isfinite(a).all()
    unguided = generate_pixart(model, inp["y"][:2], inp["mask"][:2], sampler="ddim", steps=2, cfg_scale=1.0)
    assert unguided.shape == a.shape


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("additional", [False, True])
def test_pixart_macs_match_flop_counter(additional: bool) -> None:
    model = PixArt(tiny_config(use_additional_conditions=additional)).eval()
    inp = inputs(2)
    kw = {"added_cond_kwargs": inp["sizes"] if additional else None}
    measured = measure_macs(model, inp["x"], inp["t"], inp["y"], encoder_attention_mask=inp["mask"], **kw)
    assert measured == 2 * pixart_macs(model.config, text_len=TOKENS).total
    assert model_params(model.config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("grid", [(2, 2), (3, 5), (8, 8)])
def test_sparse_pixart_macs_match_flop_counter(grid: tuple[int, int]) -> None:
    model = sparse_model(use_additional_conditions=True)
    inp = inputs(1, (16, 16))
    measured = measure_macs(model, inp["x"], inp["t"], inp["y"], encoder_attention_mask=inp["mask"],
                            added_cond_kwargs=inp["sizes"], grid=grid)
    assert measured == sparse_pixart_macs(model.config, grid, text_len=TOKENS).total
    assert model_params(model.config) == sum(p.numel() for p in model.parameters())


def test_paper_table3_at_256px() -> None:
    """Paper Table 3: PixArt-alpha 148.73 G, SparseDiT 91.62 G (r in [0.61, 0.86], 100 IDDPM steps)."""
    from sparsedit.diffusion.process import space_timesteps

    dense = pixart_config(256)
    assert abs(pixart_macs(dense).gmacs - 148.73) / 148.73 < 0.005
    sparse = SparsePixArtConfig.from_pixart(dense, "SparseDiT-XL", r_min=0.61, r_max=0.86)
    mean = schedule_macs(sparse, sorted(space_timesteps(1000, "100")))["gmacs"]
    assert abs(mean - 91.62) / 91.62 < 0.005
    assert pixart_macs(pixart_config(512)).gmacs > 4 * 148.73  # 512 px is far from the table


def test_training_step_with_caption_dropout_and_checkpointing() -> None:
    model = sparse_model().train()
    model.config.class_dropout_prob = model.y_embedder.dropout_prob = 1.0  # every caption -> null caption
    model.gradient_checkpointing = True
    inp = inputs(2, (16, 16))
    out = model(inp["x"], torch.full((2,), 700), inp["y"][:2], inp["mask"][:2])
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():  # with dropout 1 the captions do not matter
        again = model(inp["x"], torch.full((2,), 700), torch.randn(2, TOKENS, CAPTION), inp["mask"][:2])
    assert torch.equal(out.detach(), again)
