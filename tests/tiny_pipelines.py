"""Tiny FluxPipeline / StableDiffusion3Pipeline folders on disk, built offline with diffusers' and transformers' own
classes: random CLIP and T5 text encoders over a few-word vocabulary, a 4-channel VAE with SD3-style scaling and shift
factors, and a small random transformer. They stand in for the released pipeline folders in the CLI recipes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from helpers import randomize, tiny_text_encoder

WORDS = "a small cactus with happy face dog on the red cat"
T5_WIDTH, CLIP_WIDTH, LATENT_CHANNELS = 32, 16, 4


def clip_tokenizer(folder: Path, words: str = WORDS) -> object:
    """A CLIP byte-pair tokenizer whose vocabulary is the letters and whole words of ``words`` (77 tokens long)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(set(words.replace(" ", ""))):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = ["#version: 0.2"]
    for word in words.split():  # merge left to right until the word is one token
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair = f"{parts[0]} {parts[1]}"
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1], *parts[2:]]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=77)


def clip_encoder(vocab: int, projection: bool) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=CLIP_WIDTH, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=CLIP_WIDTH,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def vae() -> nn.Module:
    """A 2x-downsampling AutoencoderKL with 4 latent channels and FLUX-like scaling / shift factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=32, scaling_factor=0.36, shift_factor=0.11).eval()


def _t5() -> tuple[nn.Module, object]:
    encoder, tokenizer = tiny_text_encoder(T5_WIDTH, WORDS)
    tokenizer.model_max_length = 512
    return encoder, tokenizer


def save_flux_pipeline(root: Path, guidance: bool = True, seed: int = 0) -> Path:
    """A FluxPipeline folder (FLUX.1-dev style with ``guidance``, else schnell style) with a 2 + 2 block transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(root / "_clip_vocab")
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH, guidance_embeds=guidance,
        axes_dims_rope=(2, 2, 4))
    randomize(transformer, 0.1)
    t5, t5_tokenizer = _t5()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, vae=vae(), text_encoder=clip_encoder(len(tokenizer), False),
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer, scheduler=scheduler)
    pipe.save_pretrained(str(root))
    shutil.rmtree(root / "_clip_vocab")
    return root


def save_sd3_pipeline(root: Path, seed: int = 0) -> Path:
    """A StableDiffusion3Pipeline folder (two CLIPs, a T5, SD3.5-style q/k norms) with a 3-block transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(root / "_clip_vocab")
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
        pooled_projection_dim=2 * CLIP_WIDTH, out_channels=LATENT_CHANNELS, pos_embed_max_size=32, qk_norm="rms_norm")
    randomize(transformer, 0.1)
    t5, t5_tokenizer = _t5()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=clip_encoder(len(tokenizer), True), tokenizer=tokenizer,
        text_encoder_2=clip_encoder(len(tokenizer), True), tokenizer_2=tokenizer, text_encoder_3=t5,
        tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(str(root))
    shutil.rmtree(root / "_clip_vocab")
    return root
