"""Prompts -> T5 caption embeddings with a local T5 encoder (for PixArt-alpha and text Latte).

sparsedit does not ship or download T5: pass a local directory. Two layouts are read:

* a diffusers text-to-image pipeline root (e.g. ``PixArt-alpha/PixArt-XL-2-512x512`` from the Hugging
  Face Hub) with ``text_encoder/`` and ``tokenizer/`` subfolders, or
* one directory holding both a ``T5EncoderModel`` and its tokenizer (e.g. ``google/t5-v1_1-xxl``, the
  encoder PixArt-alpha was trained with).

The tokenisation follows diffusers' ``PixArtAlphaPipeline.encode_prompt`` with ``clean_caption=False``
(lower-cased, stripped, padded / truncated to ``max_length`` tokens, an attention mask marking the real
tokens; https://github.com/huggingface/diffusers, pipelines/pixart_alpha), so a prompt gives the same
embedding here as in that pipeline. Needs ``transformers`` (``pip install transformers sentencepiece``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsedit.errors import SparseditError, quiet_logs

# Caption length of PixArt-alpha and Latte-T2V prompts: diffusers' max_sequence_length default (120 T5 tokens).
CAPTION_TOKENS = 120

__all__ = ["T5Encoder", "encode_prompts"]

WHERE = ("a local copy of huggingface.co/PixArt-alpha/PixArt-XL-2-512x512 (its text_encoder/ and tokenizer/ "
         "folders) or of huggingface.co/google/t5-v1_1-xxl")


def _folders(path: Path) -> tuple[Path, Path]:
    """(encoder directory, tokenizer directory) of a pipeline root or a single T5 directory."""
    if not path.is_dir():
        raise SparseditError(f"T5 directory {path} does not exist; pass {WHERE}")
    if (path / "text_encoder").is_dir() and (path / "tokenizer").is_dir():
        return path / "text_encoder", path / "tokenizer"
    if (path / "config.json").is_file():
        return path, path
    raise SparseditError(f"{path} holds neither text_encoder/ + tokenizer/ nor a T5 config.json; pass {WHERE}")


class T5Encoder:
    """A local T5 encoder and its tokenizer, loaded once; call it on prompts for (embeddings, mask)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError as err:
            raise SparseditError("encoding prompts needs transformers: pip install transformers sentencepiece "
                                 "(or pass precomputed --prompt-embeds)") from err
        from transformers.utils import logging as transformers_logging

        encoder_dir, tokenizer_dir = _folders(Path(path))
        try:
            with quiet_logs(transformers_logging, transformers_logging.ERROR):
                self.tokenizer: Any = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
                self.encoder: Any = T5EncoderModel.from_pretrained(encoder_dir, local_files_only=True,
                                                                   torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise SparseditError(f"cannot load a T5 encoder and tokenizer from {path}: "
                                 f"{str(err).splitlines()[0]}; pass {WHERE}") from err
        self.encoder = self.encoder.to(device).eval()
        self.device = torch.device(device)

    @property
    def channels(self) -> int:
        return int(self.encoder.config.d_model)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], max_length: int = CAPTION_TOKENS) -> tuple[Tensor, Tensor]:
        """Prompts -> ((N, max_length, C) fp32 embeddings, (N, max_length) 0/1 mask of the real tokens)."""
        if isinstance(prompts, str) or not prompts:
            raise SparseditError("pass a non-empty list of prompts")
        texts = [p.lower().strip() for p in prompts]  # PixArt's preprocessing without caption cleaning
        tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        ids = tokens.input_ids.to(self.device)  # (N, L)
        mask = tokens.attention_mask.to(self.device)  # (N, L)
        embeds = self.encoder(ids, attention_mask=mask)[0]  # (N, L, C)
        return embeds.float(), mask.float()


    def text(self, prompts: Sequence[str], negative: str | None = None, with_negative: bool = True) -> dict[str, Tensor]:
        """Prompts -> ``{"embeds", "mask"}`` and, with ``with_negative``, ``"null_embeds"`` / ``"null_mask"``: the
        negative prompt (default the empty one, as diffusers' pipelines) at the same length, one row."""
        embeds, mask = self(prompts)
        out = {"embeds": embeds, "mask": mask}
        if with_negative:
            null, null_mask = self([negative or ""], embeds.shape[1])
            out.update(null_embeds=null, null_mask=null_mask)
        return out


def encode_prompts(prompts: Sequence[str], t5_path: str | Path, max_length: int = CAPTION_TOKENS,
                   device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """One-shot :class:`T5Encoder`: ``prompts`` -> (embeddings (N, L, C), mask (N, L))."""
    return T5Encoder(t5_path, device)(prompts, max_length)
