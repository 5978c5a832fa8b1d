"""Plain helpers shared by several test modules (``from helpers import ...``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import Dataset, Subset

from sparsedit.train.data import DigitsDataset
from sparsedit.train.trainer import TrainSettings


@torch.no_grad()
def randomize(module: nn.Module, std: float = 0.2) -> nn.Module:
    """Overwrite every parameter with N(0, std^2), in place; returns ``module``.

    Zero-initialised layers (adaLN-Zero, the output projection, W1) would otherwise hide mapping
    errors: random weights give non-trivial adaLN shift/scale/gate and non-zero biases.
    """
    for p in module.parameters():
        p.normal_(0.0, std)
    return module


def tiny_text_encoder(width: int, words: str = "a small cactus with happy face dog on the") -> tuple[nn.Module, object]:
    """A 1-layer T5 encoder of ``width`` and a T5 tokenizer over a tiny in-memory vocabulary (unknown words -> <unk>).

    Needs transformers and tokenizers; nothing is downloaded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = ["<pad>", "</s>", "<unk>"] + [f"\u2581{w}" for w in words.split()]
    tok = Tokenizer(models.Unigram([(w, -1.0) for w in vocab], unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=width, d_ff=32, d_kv=8, num_layers=1,
                                      num_heads=2))
    return encoder.eval(), tokenizer


def one_line(err: pytest.ExceptionInfo, *words: str) -> str:
    """The error is a single line naming every word in ``words``; returns it."""
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg, msg
    for word in words:
        assert word in msg, (word, msg)
    return msg


class Exploit:
    """Unpickling this would create ``marker``: a loader must refuse instead of running it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def run_doc_snippets(doc: Path) -> tuple[int, list[str]]:
    """Run every python block of ``doc`` in order, in one namespace, in the current directory.

    Returns how many blocks ran and the lines their ``print(...)  # expected`` comments promise, in order.
    """
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    namespace: dict = {"__name__": "doc"}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), namespace)
    expected = [m.group(1) for b in blocks for m in re.finditer(r"^print\(.*\)  # (.*)$", b, flags=re.M)]
    return len(blocks), expected


def digits(n: int | None = None) -> Dataset:
    """The embedded digits' train split at 16 px, or its first ``n`` images."""
    ds = DigitsDataset(split="train", resolution=16)
    return ds if n is None else Subset(ds, range(n))


def settings(**kw: object) -> TrainSettings:
    """Short-run training settings for tests (2 steps of batch 8, a log line per step); ``kw`` overrides."""
    base: dict[str, object] = dict(steps=2, batch_size=8, log_every=1, ckpt_every=100)
    base.update(kw)
    return TrainSettings(**base)  # type: ignore[arg-type]


def record(model: nn.Module, names: list[str]) -> dict[str, list]:
    """Forward hooks recording (args, output) of the named submodules."""
    seen: dict[str, list] = {}
    modules = dict(model.named_modules())
    for name in names:
        modules[name].register_forward_hook(lambda m, a, o, name=name: seen.setdefault(name, []).append((a, o)))
    return seen


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Max error relative to the largest value of ``b`` under ``tol``."""
    return bool(((a - b).abs().max() / b.abs().max()) < tol)


class OpShapes(TorchDispatchMode):
    """Records the shape of every tensor each aten op returns (to check that no large intermediate is built)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.shapes.append(tuple(o.shape))
        return out


def cli(*argv: str | Path) -> tuple[int, str, str]:
    """Run ``sparsedit`` in-process: (exit code, stdout, stderr); argparse rejections count as exit 2."""
    import contextlib
    import io

    from sparsedit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as stop:
            code = stop.code  # type: ignore[assignment]
    return code, out.getvalue(), err.getvalue()
