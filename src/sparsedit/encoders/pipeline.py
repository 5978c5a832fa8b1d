"""The text encoders and the VAE of a local diffusers pipeline folder (SD3 / SD3.5, FLUX.1).

SD3 encodes a prompt with two CLIPs and a T5, FLUX.1 with a CLIP and a T5; their pipelines' ``encode_prompt`` is
the reference for how (tokenizer lengths, which hidden state, how the pooled vectors are joined). sparsedit therefore
does not re-implement it: :func:`load_text_pipeline` builds the user's own pipeline class from the folder without
its transformer and VAE, and the family calls that pipeline's ``encode_prompt``. Nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sparsedit.errors import SparseditError, quiet_logs

__all__ = ["PIPELINE_HELP", "check_pipeline_dir", "load_text_pipeline", "pipeline_class_name", "pipeline_vae_dir"]

PIPELINE_HELP = ("the model's diffusers pipeline folder (model_index.json, text_encoder*/, tokenizer*/, vae/), e.g. "
                 "`huggingface-cli download black-forest-labs/FLUX.1-dev --local-dir FLUX.1-dev`")


def pipeline_class_name(path: str | Path) -> str:
    """The pipeline class a diffusers pipeline folder's ``model_index.json`` names; a one-line error for a folder that
    is not one."""
    root = Path(path)
    index = root / "model_index.json"
    if not index.is_file():
        hint = " (that is its transformer folder: pass its parent)" if (root.parent / "model_index.json").is_file() else ""
        raise SparseditError(f"{root} is not a diffusers pipeline folder (no model_index.json){hint}; pass "
                             f"{PIPELINE_HELP}")
    try:
        return str(json.loads(index.read_text()).get("_class_name"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise SparseditError(f"cannot read {index} ({err}); pass {PIPELINE_HELP}") from None


def check_pipeline_dir(path: str | Path, pipeline_class: str) -> Path:
    """``path`` as a pipeline root whose ``model_index.json`` names ``pipeline_class``; a one-line error otherwise."""
    root = Path(path)
    name = pipeline_class_name(root)
    if name != pipeline_class:
        raise SparseditError(f"{root} holds a {name}, but this model runs in a {pipeline_class}; pass the pipeline "
                             "folder of the model it was made from")
    return root


def pipeline_vae_dir(path: str | Path, pipeline_class: str) -> Path:
    """The ``vae/`` folder of a pipeline root (what decodes the model's latents)."""
    return check_pipeline_dir(path, pipeline_class) / "vae"


@contextmanager
def _quiet(diffusers_logging: Any, transformers_logging: Any) -> Iterator[None]:
    """The libraries' warnings and "Loading ..." progress bars off: a load prints our own lines only."""
    libs = (diffusers_logging, transformers_logging)
    enabled = [lib.is_progress_bar_enabled() for lib in libs]
    for lib in libs:
        lib.disable_progress_bar()
    try:
        with quiet_logs(diffusers_logging, diffusers_logging.ERROR), \
                quiet_logs(transformers_logging, transformers_logging.ERROR):
            yield
    finally:
        for lib, was in zip(libs, enabled, strict=True):
            if was:
                lib.enable_progress_bar()


def load_text_pipeline(path: str | Path, pipeline_class: str, device: str | torch.device = "cpu") -> Any:
    """``pipeline_class`` from the local folder ``path`` with its text encoders and tokenizers only (no transformer,
    no VAE), on ``device``: call its ``encode_prompt``."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    root = check_pipeline_dir(path, pipeline_class)
    try:
        with _quiet(diffusers_logging, transformers_logging):
            cls = getattr(diffusers, pipeline_class)  # imports the pipeline module: its import-time notes stay quiet
            pipe = cls.from_pretrained(str(root), transformer=None, vae=None, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise SparseditError(f"cannot load the text encoders of {root} ({str(err).splitlines()[0][:200]}); pass "
                             f"{PIPELINE_HELP}") from None
    return pipe.to(device)
