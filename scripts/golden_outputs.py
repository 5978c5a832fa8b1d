"""Record, then check, the sampled outputs of every family on fixed tiny models: a bit-identity check for refactors.

A restructuring that must not change behaviour (moving a family into its own package, say) is checked by
recording the outputs at the old commit and comparing at the new one, on the same machine and torch:

    git checkout OLD && .venv/bin/python scripts/golden_outputs.py record /tmp/golden.safetensors
    git checkout NEW && .venv/bin/python scripts/golden_outputs.py check /tmp/golden.safetensors

Covered: DiT, SparseDiT, PixArt, SparsePixArt, class-conditional Latte and SparseLatte, each built from a fixed
seed with random (non-zero) weights, sampled with DDPM, DDIM and DPM++ with and without classifier-free guidance.
Floating-point results depend on the CPU and the torch build, so the file is not committed: it compares two
commits on one machine.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparsedit.diffusion.sampling import generate
from sparsedit.families.dit.model import DiT, DiTConfig
from sparsedit.families.dit.sparse import SparseDiT, SparseDiTConfig
from sparsedit.families.latte.model import Latte, LatteConfig
from sparsedit.families.latte.sparse import SparseLatte, SparseLatteConfig
from sparsedit.families.latte.video import generate_latte
from sparsedit.families.pixart.model import PixArt, PixArtConfig
from sparsedit.families.pixart.sampling import generate_pixart
from sparsedit.families.pixart.sparse import SparsePixArt, SparsePixArtConfig

LAYOUT = dict(pool_blocks=1, num_sdtm=1, gen_blocks=1, sparse_blocks=1, recovery_blocks=1, dense_blocks=1, top_blocks=1)
DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=6, num_heads=2, num_classes=5)
PIXART = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=48, depth=6, num_heads=2, caption_channels=32,
              null_caption_length=8)
LATTE = dict(input_size=8, num_frames=4, patch_size=2, in_channels=4, hidden_size=48, depth=10, num_heads=2,
             num_classes=5)
SAMPLERS = ("ddpm", "ddim", "dpm++")
CFG_SCALES = (1.0, 4.0)


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` under a fixed global seed (random buffers, such as PixArt's null caption, come from it), then
    every parameter N(0, 0.1^2) from ``seed``: zero-initialised layers would hide differences."""
    torch.manual_seed(seed)
    model = build()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def models() -> dict[str, tuple[nn.Module, Callable[..., torch.Tensor]]]:
    labels = torch.tensor([0, 3])
    text = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(7))

    def dit_run(model: nn.Module, **kw: object) -> torch.Tensor:
        return generate(model, labels, **kw)

    def pixart_run(model: nn.Module, **kw: object) -> torch.Tensor:
        return generate_pixart(model, text, **kw)

    def latte_run(model: nn.Module, **kw: object) -> torch.Tensor:
        return generate_latte(model, labels, **kw)

    sparse = dict(**LAYOUT, r_min=0.3, r_max=0.9)
    return {
        "DiT": (seeded(lambda: DiT(DiTConfig(**DIT)), 1), dit_run),
        "SparseDiT": (seeded(lambda: SparseDiT(SparseDiTConfig(**DIT, **sparse)), 2), dit_run),
        "PixArt": (seeded(lambda: PixArt(PixArtConfig(**PIXART)), 3), pixart_run),
        "SparsePixArt": (seeded(lambda: SparsePixArt(SparsePixArtConfig(**PIXART, **sparse)), 4), pixart_run),
        "Latte": (seeded(lambda: Latte(LatteConfig(**LATTE)), 5), latte_run),
        "SparseLatte": (seeded(lambda: SparseLatte(SparseLatteConfig(**LATTE, num_sdtm=1, r_min=0.3, r_max=0.9)), 6),
                        latte_run),
    }


def outputs() -> dict[str, torch.Tensor]:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # thread count can change reduction order
    out = {}
    for name, (model, run) in models().items():
        for sampler in SAMPLERS:
            for cfg in CFG_SCALES:
                out[f"{name}/{sampler}/cfg{cfg:g}"] = run(model, sampler=sampler, steps=4, cfg_scale=cfg, seed=11,
                                                          progress=False)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("record", "check"))
    parser.add_argument("path", help="a .safetensors file")
    args = parser.parse_args(argv)
    now = outputs()
    if args.action == "record":
        save_file({k: v.contiguous() for k, v in now.items()}, args.path)
        print(f"recorded {len(now)} outputs in {args.path}")
        return 0
    before = load_file(args.path)
    differ = sorted(k for k in before.keys() | now.keys()
                    if k not in before or k not in now or not torch.equal(before[k], now[k]))
    print(f"{len(now) - len(differ)} of {len(before.keys() | now.keys())} outputs bit-identical"
          + (f"; differ: {', '.join(differ)}" if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
