"""Distillation from the source model: the pieces :class:`sparsedit.train.trainer.Trainer` uses.

A SparseDiT keeps the L layers of the dense model it was sparsified from, layer i initialised from
layer i, so that source is a natural frozen teacher:

* **output distillation**: on the same ``(x_t, t, conditions)`` the student's prediction (epsilon,
  and for learned-sigma models the variance channels) is pulled to the teacher's with an MSE;
* **feature distillation**: the dense tokens at the end of every sparse-dense token module and after
  the last block (before the final layer) are pulled to the teacher's tokens at the same layers. Those
  layers hold the full dense token set in both models, so the alignment is exact, token for token;
* **data-free distillation**: without the source training set, ``x_0`` comes from the teacher's own
  samples (:func:`teacher_samples`: by class label, or from prompt embeddings for caption models such as
  SD3 and FLUX.1), cached once per run.

The teacher never receives gradients and is never written into the student's checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from sparsedit.core.checkpoint import atomic_write, read_safetensors, write_safetensors
from sparsedit.core.prompts import select_prompts
from sparsedit.diffusion.process import mean_flat
from sparsedit.errors import SparseditError

TEACHER_SAMPLES_FILE = "teacher_samples.safetensors"
TEACHER_SAMPLES_META = "teacher_samples.json"


def feature_layers(model: nn.Module) -> list[int]:
    """The layers of a sparse model whose outputs are distilled: the end of every SDTM and the last block."""
    layout = getattr(model.config, "layout", None)
    if layout is None:
        raise SparseditError(f"feature distillation needs a sparse student (SparseDiT, SparsePixArt, SparseLatte), "
                             f"not a {type(model).__name__}; use output distillation only (--feature-weight 0)")
    return layout.feature_layers()


@contextmanager
def capture_block_outputs(model: nn.Module, layers: list[int], batch: int) -> Iterator[dict[int, Tensor]]:
    """Record ``model.blocks[i]``'s output for every i in ``layers`` while the context is open.

    The outputs are stored as ``model.block_tokens(i, output, batch)``: (B, tokens, D), whatever
    layout the family keeps its hidden states in (Latte alternates frame-major and token-major rows).
    Forward hooks, so the models' forward code is untouched; they are removed on exit.
    """
    captured: dict[int, Tensor] = {}
    handles = []
    for i in layers:
        def hook(_module: nn.Module, _args: Any, output: Tensor, i: int = i) -> None:
            captured[i] = model.block_tokens(i, output, batch)

        handles.append(model.blocks[i].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def output_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """(B,) MSE between the two predictions over every output channel (epsilon and, if learned, variance)."""
    if student.shape != teacher.shape:
        raise SparseditError(f"the teacher predicts {tuple(teacher.shape)} but the student {tuple(student.shape)}; "
                             "distil from the dense model the student was sparsified from")
    return mean_flat((student.float() - teacher.float()) ** 2)


def feature_loss(student: dict[int, Tensor], teacher: dict[int, Tensor]) -> Tensor:
    """(B,) mean over the tapped layers of the relative token MSE ``|s - t|^2 / mean(t^2)``.

    Each layer's error is divided by the mean square of the teacher's tokens at that layer (a constant,
    no gradient), because the residual stream grows with depth and deep layers would otherwise dominate.
    """
    terms = []
    for i, t_tokens in teacher.items():
        s_tokens = student[i]
        if s_tokens.shape != t_tokens.shape:
            raise SparseditError(f"layer {i}: the student holds {tuple(s_tokens.shape)} tokens, the teacher "
                                 f"{tuple(t_tokens.shape)}; distil from the dense model the student was sparsified from")
        t32 = t_tokens.float()
        scale = t32.pow(2).mean().clamp_min(1e-12)
        terms.append(mean_flat((s_tokens.float() - t32) ** 2) / scale)
    return torch.stack(terms).mean(dim=0)


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """A one-line error unless ``teacher`` can be the dense source of ``student`` (same depth, sizes, outputs)."""
    s, t = student.config, teacher.config
    fields = ("depth", "hidden_size", "in_channels", "out_channels", "latent_hw", "num_classes")
    diff = [f"{name} {getattr(t, name, None)} vs {getattr(s, name, None)}" for name in fields
            if getattr(t, name, None) != getattr(s, name, None)]
    if getattr(t, "layout", None) is not None:
        diff.append("the teacher is itself sparse")
    if diff:
        raise SparseditError(f"the teacher does not match the student ({'; '.join(diff)}); distil from the dense "
                             "model the student was sparsified from (--teacher, default: --init-from)")


# --------------------------------------------------------------------------------------------
# data-free distillation: the teacher's own samples as x_0
# --------------------------------------------------------------------------------------------


def check_samplable(teacher: nn.Module, text: dict[str, Tensor] | None = None) -> None:
    """Data-free distillation draws x_0 with the teacher's ``Family.generate``: class-conditional DiTs by label,
    caption-conditioned models (PixArt, SD3, FLUX.1, Latte-T2V, Wan) from the prompt embeddings ``text``."""
    from sparsedit.families import family_of

    family = family_of(teacher)
    cfg = teacher.config
    if family.text_conditioned:
        if text is None:
            raise SparseditError(f"data-free distillation of a {type(teacher).__name__} samples the teacher from prompts: "
                                 "pass --prompt-embeds FILE (write it with `sparsedit encode-prompts`)")
        return
    if text is not None:
        raise SparseditError(f"a {type(teacher).__name__} takes no prompts: drop --prompt-embeds")
    if cfg.model_type != "DiT" or cfg.num_classes <= 0:
        raise SparseditError(f"data-free distillation samples class-conditional DiT teachers and caption-conditioned "
                             f"models, not a {type(teacher).__name__}; train it on a latents directory instead")


class TeacherSamples(Dataset):
    """``(x_0, label)`` pairs sampled from the teacher (:func:`teacher_samples`), or ``(x_0, cond)`` with ``cond`` the
    caption inputs of the prompt sample i was drawn from (row ``i % prompts`` of ``text``); an in-memory data set."""

    def __init__(self, samples: Tensor, labels: Tensor, text: dict[str, Tensor] | None = None):
        if samples.shape[0] != labels.shape[0]:
            raise SparseditError(f"{samples.shape[0]} teacher samples but {labels.shape[0]} labels")
        self.samples, self.labels = samples.float(), labels.long()
        self.text = text
        null = None if text is None else text.get("null_embeds")
        self.null_caption = None if null is None else null[0].float()  # caption dropout's empty prompt (PixArt)

    def __len__(self) -> int:
        return self.samples.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Any]:
        if self.text is None:
            return self.samples[i], int(self.labels[i])
        j = int(self.labels[i])  # the prompt's row
        cond = {"encoder_hidden_states": self.text["embeds"][j].float()}
        for key, name in (("mask", "encoder_attention_mask"), ("pooled", "pooled_projections")):
            if key in self.text:
                cond[name] = self.text[key][j].float() if key == "pooled" else self.text[key][j].long()
        return self.samples[i], cond


def _fingerprint(text: dict[str, Tensor]) -> str:
    """SHA-256 of the prompt tensors: a cache drawn from other prompts is refused, not reused."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(text):
        digest.update(key.encode())
        digest.update(text[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def teacher_samples(teacher: nn.Module, num: int, cache_dir: str | Path, *, text: dict[str, Tensor] | None = None,
                    seed: int = 0, device: str | torch.device = "cpu", progress: bool = True) -> TeacherSamples:
    """``num`` samples of the teacher, cached: class-balanced for a class-conditional DiT (label ``i % num_classes``),
    one per prompt in turn for a caption model (prompt ``i % N`` of ``text``, a :func:`read_prompt_embeds` dict).

    The teacher is sampled as its family says (``Family.teacher_sampling``: DDIM 50 without guidance for DiT-style
    models; the pipeline's default Euler run and guidance for SD3 / FLUX.1). The samples are written to ``cache_dir``
    (all-or-nothing) with the settings that made them; a later call with the same settings reads them back (a
    resumed run does not sample again), other settings are refused rather than mixed. Chunk k is drawn with seed
    ``seed * 100003 + k``.
    """
    from sparsedit.families import family_of

    check_samplable(teacher, text)
    cfg = teacher.config
    family = family_of(teacher)
    if num < 1:
        raise SparseditError(f"--data-free needs at least 1 sample, got {num}")
    how = family.teacher_sampling()
    batch_size = how.pop("batch_size", 250)
    settings = {"num": num, **how, "seed": seed, "batch_size": batch_size, "teacher": cfg.to_dict()}
    if text is not None:
        settings["prompts_sha256"] = _fingerprint(text)
    cache = Path(cache_dir)
    data_path, meta_path = cache / TEACHER_SAMPLES_FILE, cache / TEACHER_SAMPLES_META
    if data_path.exists() and meta_path.exists():
        saved = json.loads(meta_path.read_text())
        if saved != json.loads(json.dumps(settings)):
            raise SparseditError(f"{cache} holds teacher samples made with other settings; use a new --run-dir")
        tensors = read_safetensors(data_path)
        return TeacherSamples(tensors["samples"], tensors["labels"], text)
    rows = cfg.num_classes if text is None else text["embeds"].shape[0]
    labels = torch.arange(num) % rows
    chunks = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num, desc="teacher samples", unit="img", dynamic_ncols=True)
    was_training = teacher.training
    teacher.eval()
    try:
        for k, start in enumerate(range(0, num, batch_size)):
            part = labels[start:start + batch_size]
            if text is None:
                cond: dict[str, Any] = {"labels": part}
            else:
                cond = {"text": {key: v.to(device) for key, v in select_prompts(text, part).items()}}
            with torch.no_grad():
                chunks.append(family.generate(teacher, **cond, **how, seed=seed * 100003 + k, device=device,
                                              progress=False).cpu())
            if bar is not None:
                bar.update(len(part))
    finally:
        teacher.train(was_training)
        if bar is not None:
            bar.close()
    samples = torch.cat(chunks)
    if cfg.data_space == "pixel":
        samples = samples.clamp(-1, 1)  # what an image of the teacher is
    cache.mkdir(parents=True, exist_ok=True)
    write_safetensors(data_path, {"samples": samples.contiguous(), "labels": labels},
                      metadata={"format": "pt"})
    atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(settings, indent=1, sort_keys=True)))
    return TeacherSamples(samples, labels, text)
