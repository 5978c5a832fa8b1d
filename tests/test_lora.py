"""Users' diffusers LoRAs on dense and sparse SD3 / FLUX (and PixArt) models: ``sparsedit.lora.load_lora``.

Every LoRA here is made the way users make them: peft's ``add_adapter(LoraConfig(...))`` on diffusers' own
transformer (lora_B randomised: peft zero-initialises it), saved with the pipeline's ``save_lora_weights`` and read
back by ``pipe.load_lora_weights``. The dense model with the LoRA merged must equal diffusers' transformer with the
adapter active, and fused (tensor by tensor); a sparse model must receive, tensor by tensor, the delta of its
source tensor restricted by the family's rule map; the report must list what was dropped and what was not read.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from torch import Tensor, nn

import helpers
import sparsedit
from sparsedit.errors import SparseditError
from sparsedit.families import family_of
from sparsedit.interop import use_in_pipeline
from sparsedit.lora import LoraReport, load_lora, read_lora

pytestmark = pytest.mark.usefixtures("single_thread")

CAPTION, POOLED, TEXT = 24, 12, 5
RANK, ALPHA = 4, 8  # alpha != r: the scaling alpha / r must come from the file's metadata

# Attention and MLP linears of both FLUX block types (double: to_q ... ff_context; single: to_q/k/v, proj_mlp,
# proj_out), their adaLN regressors, and the final adaLN (whose halves our layout swaps) and embedders.
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
                "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder",
                "context_embedder"]
# SD3.5-style joint blocks with dual attention (attn2), the patch convolution (a conv LoRA), both swapped regressors.
SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
               "norm1_context.linear", "norm_out.linear", "proj_out", "pos_embed.proj", "context_embedder"]
LAYOUT = "1,1,2,1,2,1,1"  # pool, gen, gen+, sparse, recover, recover+, dense, top: every block kind in 8 blocks


# ------------------------------------------------------------------------------------------------
# tiny models, their LoRAs and their calls
# ------------------------------------------------------------------------------------------------


def flux_reference() -> nn.Module:
    """3 double- and 5 single-stream blocks of width 32, guidance-distilled (dev-style), every parameter random."""
    ref = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=3, num_single_layers=5, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=CAPTION, pooled_projection_dim=POOLED,
                                 guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return helpers.randomize(ref, 0.1).eval()


def sd3_reference(width_heads: int = 4) -> nn.Module:
    """8 joint blocks of width 8 x heads (SD3.5-style: RMS q/k norm, dual attention in blocks 0-3)."""
    ref = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=8, attention_head_dim=8,
                                num_attention_heads=width_heads, joint_attention_dim=CAPTION,
                                caption_projection_dim=8 * width_heads, pooled_projection_dim=POOLED, out_channels=4,
                                pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0, 1, 2, 3))
    helpers.randomize(ref, 0.1).eval()
    with torch.no_grad():
        ref.pos_embed.pos_embed.normal_()
    return ref


# FLUX's LoRA also has per-module ranks and alphas (PEFT's rank_pattern / alpha_pattern, kept in the file's metadata).
PATTERNS = dict(rank_pattern={"proj_mlp": 2}, alpha_pattern={"ff.net.2": 16})
FAMILIES = {
    "flux": dict(reference=flux_reference, cls=FluxTransformer2DModel, pipeline=FluxPipeline, targets=FLUX_TARGETS,
                 patterns=PATTERNS,
                 dropped={"transformer_blocks.0.attn.to_q"}),  # the double-stream poolingformer's image queries
    "sd3": dict(reference=sd3_reference, cls=SD3Transformer2DModel, pipeline=StableDiffusion3Pipeline,
                targets=SD3_TARGETS, patterns={},
                dropped={"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn2.to_q",
                         "transformer_blocks.0.attn2.to_k"}),  # image queries; the dual attention keeps only V
}


def add_lora(ref: nn.Module, targets: list[str], std: float = 0.1, **patterns: dict[str, int]) -> LoraConfig:
    """A peft LoRA on ``ref`` (in place), lora_B random (peft starts it at zero)."""
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, **patterns)
    ref.add_adapter(config)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    return config


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """Per family: the base transformer saved as a diffusers directory, and a LoRA file of it saved with the
    pipeline's ``save_lora_weights`` (with diffusers' adapter metadata, so alpha = 8 is in the file)."""
    out: dict[str, dict[str, object]] = {}
    for name, spec in FAMILIES.items():
        torch.manual_seed(0)
        root = tmp_path_factory.mktemp(name)
        ref = spec["reference"]()  # type: ignore[operator]
        ref.save_pretrained(root / "base")
        adapted = copy.deepcopy(ref)
        config = add_lora(adapted, spec["targets"], **spec["patterns"])  # type: ignore[arg-type]
        spec["pipeline"].save_lora_weights(root / "lora", transformer_lora_layers=get_peft_model_state_dict(adapted),  # type: ignore[attr-defined]
                                           transformer_lora_adapter_metadata=config.to_dict())
        out[name] = dict(base=root / "base", lora=root / "lora", file=root / "lora" / "pytorch_lora_weights.safetensors")
    return out


def pipeline(name: str, transformer: nn.Module) -> object:
    none = ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    if name == "sd3":
        none += ["text_encoder_3", "tokenizer_3"]
    return FAMILIES[name]["pipeline"](transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),  # type: ignore[operator]
                                      **dict.fromkeys(none))


def inputs(name: str, seed: int = 1) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hw = (6, 10) if name == "flux" else (8, 8)
    return dict(x=torch.randn(2, 4, *hw, generator=gen), sigma=torch.tensor([0.9, 0.3]),
                text=torch.randn(2, TEXT, CAPTION, generator=gen), pooled=torch.randn(2, POOLED, generator=gen))


@torch.no_grad()
def theirs(name: str, ref: nn.Module, inp: dict[str, Tensor]) -> Tensor:
    """diffusers' transformer as its pipeline calls it (FLUX: packed latents, image ids, guidance 3.5)."""
    x = inp["x"]
    if name == "sd3":
        return ref(hidden_states=x, encoder_hidden_states=inp["text"], pooled_projections=inp["pooled"],
                   timestep=inp["sigma"] * 1000).sample
    b, c, h, w = x.shape
    out = ref(hidden_states=FluxPipeline._pack_latents(x, b, c, h, w), timestep=inp["sigma"],
              guidance=torch.full((b,), 3.5), pooled_projections=inp["pooled"], encoder_hidden_states=inp["text"],
              txt_ids=torch.zeros(TEXT, 3), img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu",
                                                                                           torch.float32),
              return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


@torch.no_grad()
def ours(name: str, model: nn.Module, inp: dict[str, Tensor]) -> Tensor:
    t = inp["sigma"] * 1000
    if name == "sd3":
        return model(inp["x"], t, inp["text"], inp["pooled"])
    return model(inp["x"], t, inp["text"], inp["pooled"], torch.full((2,), 3.5))


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# dense: equal to diffusers with the adapter active, and fused; the file is what diffusers reads
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_dense_model_with_the_lora_equals_diffusers(made: dict, name: str, tmp_path: Path) -> None:
    paths = made[name]
    model = sparsedit.load_model(paths["base"])
    before = snapshot(model)
    report = load_lora(model, paths["lora"])  # the directory, as pipe.load_lora_weights takes it
    assert isinstance(report, LoraReport) and report.dropped == [] and report.ignored == []
    state, _ = read_lora(paths["file"])
    assert report.num_applied == len(state) // 2  # every A / B pair of the file

    # The file is what the pipeline reads: its adapter, active at scale 1, computes what our merged model computes.
    pipe = pipeline(name, FAMILIES[name]["cls"].from_pretrained(paths["base"]).eval())  # type: ignore[attr-defined]
    reference = pipe.transformer  # type: ignore[attr-defined]
    pipe.load_lora_weights(paths["lora"])  # type: ignore[attr-defined]
    assert reference.peft_config["default_0"].lora_alpha == ALPHA  # read from the file's metadata
    inp = inputs(name)
    assert rel_err(ours(name, model, inp), theirs(name, reference, inp)) < 1e-5

    # Fused at scale 0.5: diffusers' weights, read back through our converter, are ours tensor by tensor.
    pipe.fuse_lora(lora_scale=0.5)  # type: ignore[attr-defined]
    pipe.unload_lora_weights()  # type: ignore[attr-defined]  # keeps the fused weights
    reference.save_pretrained(tmp_path / "fused")
    fused = sparsedit.load_model(tmp_path / "fused").state_dict()
    assert sum(not torch.allclose(fused[k], before[k]) for k in fused) == len(report.changed)
    load_lora(model, paths["file"], scale=-0.5)  # 1.0 - 0.5
    got = model.state_dict()
    assert all(torch.allclose(got[k], fused[k], rtol=1e-5, atol=1e-6) for k in fused)

    # Undo: the same LoRA at the opposite scale subtracts exactly the same delta (to float rounding).
    load_lora(model, paths["file"], scale=-0.5)
    assert all(torch.allclose(got[k], before[k], rtol=0, atol=1e-6) for k in before)
    assert sum(not torch.equal(got[k], before[k]) for k in before) > 0  # rounding, not a no-op


# ------------------------------------------------------------------------------------------------
# sparse: layer i gets exactly the delta of layer i, restricted by the rule map
# ------------------------------------------------------------------------------------------------


def check_sparse_deltas(dense: nn.Module, sparse: nn.Module, lora: object, dropped: set[str]) -> LoraReport:
    """Apply ``lora`` to ``dense`` and ``sparse``; every sparse tensor's change is its source tensor's change on
    the rows its rule keeps; new tensors (the recovery merges) do not change; returns the sparse report."""
    dense_before, sparse_before = snapshot(dense), snapshot(sparse)
    dense_report = load_lora(dense, lora)
    report = load_lora(sparse, lora)
    dense_delta = {k: v - dense_before[k] for k, v in dense.state_dict().items()}
    after = sparse.state_dict()
    changed = 0
    for rule in family_of(sparse).init_rules(sparse):
        got = after[rule.target] - sparse_before[rule.target]
        if rule.rule == "copy":
            want = dense_delta[rule.source]
        elif rule.rule == "slice":
            want = dense_delta[rule.source][rule.rows[0]:rule.rows[1]]
        else:  # zeros / identity: no source layer
            want = torch.zeros_like(got)
        assert torch.equal(got, want), rule.describe()
        changed += bool(want.any())
    assert changed == len(report.changed) > 0
    assert {m for m, _ in report.dropped} == dropped
    assert all("poolingformer" in why for _, why in report.dropped)
    assert set(report.applied) == set(dense_report.applied) - dropped
    return report


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_sparse_model_gets_the_source_layers_deltas(made: dict, name: str) -> None:
    paths = made[name]
    dense = sparsedit.load_model(paths["base"])
    sparse = family_of(dense).sparsify(dense, LAYOUT, None, r_min=0.3, r_max=0.8)  # before the LoRA
    assert family_of(sparse).block_kinds() == ["pool", "gen", "gen+", "sparse", "recover", "recover+", "dense", "top"]
    report = check_sparse_deltas(dense, sparse, paths["file"], FAMILIES[name]["dropped"])  # type: ignore[arg-type]
    assert "dropped" in str(report) and "block 0 (poolingformer)" in str(report)


def test_lora_runs_on_a_sparse_flux_in_flux_pipeline(made: dict) -> None:
    """The acceptance scenario: a SparseFLUX with the user's LoRA merged runs in FluxPipeline end to end."""
    paths = made["flux"]
    ref = FluxTransformer2DModel.from_pretrained(paths["base"]).eval()
    sparse = family_of(dense := sparsedit.load_model(paths["base"])).sparsify(dense, LAYOUT, None, r_min=0.3, r_max=0.8)
    pipe = pipeline("flux", ref)
    call = dict(prompt_embeds=torch.randn(1, TEXT, CAPTION), pooled_prompt_embeds=torch.randn(1, POOLED), height=96,
                width=128, num_inference_steps=3, output_type="latent", guidance_scale=3.5)
    use_in_pipeline(pipe, sparse)
    plain = pipe(generator=torch.Generator().manual_seed(1), **call).images  # type: ignore[operator]

    report = load_lora(sparse, paths["lora"])
    assert report.num_applied > 0 and report.dropped
    use_in_pipeline(pipe, sparse)  # the face shares the weights: dropping it in again is not needed, but allowed
    images = pipe(generator=torch.Generator().manual_seed(1), **call).images  # type: ignore[operator]
    assert images.shape == (1, 48, 16) and torch.isfinite(images).all()
    assert not torch.allclose(images, plain)


# ------------------------------------------------------------------------------------------------
# formats read, refusals, notes
# ------------------------------------------------------------------------------------------------


def test_alpha_keys_the_older_naming_and_a_given_config_merge_the_same(made: dict, tmp_path: Path) -> None:
    """The file's metadata (alpha 8, alpha_pattern ff.net.2: 16, rank_pattern proj_mlp: 2), the same alphas as
    ``.alpha`` keys (in memory and in a ``pytorch_lora_weights.bin``), as ``.alpha`` keys with diffusers' older
    ``lora.down`` / ``lora.up`` names, and as ``adapter_config``: the same merge. Without any alpha, alpha = r: the
    delta is B @ A."""
    state, meta = read_lora(made["flux"]["file"])
    assert meta["transformer.lora_alpha"] == ALPHA and meta["transformer.alpha_pattern"] == {"ff.net.2": 16}
    modules = {k.rsplit(".lora_", 1)[0] for k in state}
    alphas = {f"{m}.alpha": torch.tensor(16.0 if m.endswith(".ff.net.2") else float(ALPHA)) for m in modules}
    old_names = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in state.items()}
    config = {k.removeprefix("transformer."): v for k, v in meta.items()}
    (tmp_path / "bin").mkdir()
    torch.save({**state, **alphas}, tmp_path / "bin" / "pytorch_lora_weights.bin")
    variants = {"metadata": (made["flux"]["file"], None), "alpha keys": ({**state, **alphas}, None),
                "bin": (tmp_path / "bin", None),
                "old names": ({**old_names, **alphas}, None), "adapter_config": (state, config)}
    results = {}
    for label, (lora, given) in variants.items():
        model = sparsedit.load_model(made["flux"]["base"])
        load_lora(model, lora, adapter_config=given)  # type: ignore[arg-type]
        results[label] = model.state_dict()
    first = results["metadata"]
    for label, got in results.items():
        assert all(torch.allclose(got[k], first[k], rtol=1e-6, atol=1e-7) for k in first), label
    model = sparsedit.load_model(made["flux"]["base"])
    before = model.blocks[1].img_attn.proj.weight.detach().clone()
    load_lora(model, state)  # no metadata, no alpha keys
    A, B = (state[f"transformer.transformer_blocks.1.attn.to_out.0.lora_{p}.weight"] for p in "AB")
    assert torch.allclose(model.blocks[1].img_attn.proj.weight - before, B @ A, rtol=1e-5, atol=1e-6)


def test_a_bfloat16_model_takes_the_delta_in_its_dtype(made: dict) -> None:
    model = sparsedit.load_model(made["flux"]["base"])
    half = sparsedit.load_model(made["flux"]["base"]).to(torch.bfloat16)
    load_lora(model, made["flux"]["file"])
    load_lora(half, made["flux"]["file"])
    assert all(v.dtype == torch.bfloat16 for v in half.state_dict().values())
    want = model.state_dict()
    assert all(torch.allclose(v.float(), want[k], rtol=2e-2, atol=2e-2) for k, v in half.state_dict().items())


def test_text_encoder_and_unknown_keys_are_listed_not_dropped_silently(made: dict) -> None:
    state, _ = read_lora(made["flux"]["file"])
    extra = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 8),
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 4),
             "transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.randn(4, 32),  # a deeper model's block
             "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.randn(32, 4)}
    model = sparsedit.load_model(made["flux"]["base"])
    report = load_lora(model, {**state, **extra})
    ignored = dict(report.ignored)
    assert set(ignored) == set(extra)
    assert "text encoder" in ignored["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"]
    assert "transformer_blocks.7.attn.to_q" in ignored["transformer.transformer_blocks.7.attn.to_q.lora_B.weight"]
    assert "ignored 4 key(s)" in report.summary()
    # nothing but text-encoder keys: nothing to merge is an error, not an empty report
    with pytest.raises(SparseditError) as err:
        load_lora(model, {k: v for k, v in extra.items() if k.startswith("text_encoder")})
    helpers.one_line(err, "no LoRA layer of a FLUX")


def test_a_lora_for_another_model_is_refused_naming_the_key(made: dict) -> None:
    """An SD3 LoRA of width 48 on a FLUX of width 32: shared module names, other shapes. Nothing is changed."""
    torch.manual_seed(1)
    other = sd3_reference(width_heads=6)
    add_lora(other, ["to_q", "to_k", "to_v"])
    lora = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(other).items()}
    model = sparsedit.load_model(made["flux"]["base"])
    before = snapshot(model)
    with pytest.raises(SparseditError) as err:
        load_lora(model, lora)
    msg = helpers.one_line(err, "LoRA key transformer.transformer_blocks.0.attn.to_", "another model")
    assert "48" in msg and "32" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # a truncated pair and a DoRA adapter are refused too; a DiT has no diffusers key map
    with pytest.raises(SparseditError) as err:
        load_lora(model, {"transformer.proj_out.lora_A.weight": torch.randn(4, 32)})
    helpers.one_line(err, "transformer.proj_out.lora_A.weight", "no lora_B")
    with pytest.raises(SparseditError) as err:
        load_lora(model, {**lora, "transformer.proj_out.lora_magnitude_vector": torch.randn(64)})
    helpers.one_line(err, "DoRA")
    from sparsedit.families.dit import DiT, DiTConfig

    with pytest.raises(SparseditError) as err:
        load_lora(DiT(DiTConfig(input_size=8, depth=1, hidden_size=16, num_heads=2)), lora)
    helpers.one_line(err, "not a DiT")


# ------------------------------------------------------------------------------------------------
# PixArt: a peft adapter on the diffusers transformer (PixArtAlphaPipeline has no LoRA loader)
# ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape")  # peft's check mistakes lora_B.bias
def test_pixart_dense_and_sparse(tmp_path: Path) -> None:
    ref = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                   num_layers=8, cross_attention_dim=32, sample_size=8, patch_size=2,
                                   caption_channels=CAPTION, use_additional_conditions=False)
    helpers.randomize(ref, 0.1).eval().save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(copy.deepcopy(ref), LoraConfig(r=RANK, lora_alpha=ALPHA, lora_bias=True, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out", "adaln_single.linear"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:  # the weights and, with lora_bias, the biases
                p.normal_(0.0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")  # adapter_model.safetensors + adapter_config.json (alpha 8)
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")

    model = sparsedit.load_model(tmp_path / "base")
    sparse = family_of(model).sparsify(model, LAYOUT, None, r_min=0.3, r_max=0.8)
    load_lora(model, tmp_path / "adapter")  # PEFT's names: base_model.model.transformer_blocks.0.attn1.to_q...
    merged = sparsedit.load_model(tmp_path / "merged").state_dict()
    got = model.state_dict()
    assert all(torch.allclose(got[k], merged[k], rtol=1e-5, atol=1e-6) for k in merged)
    # a PixArt poolingformer keeps V only: its image Q and K deltas are dropped
    check_sparse_deltas(sparsedit.load_model(tmp_path / "base"), sparse, tmp_path / "adapter",
                        {"transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k"})
