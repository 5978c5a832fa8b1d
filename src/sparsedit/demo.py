"""The main job on the embedded default, end to end (``sparsedit demo`` = ``make demo``).

shipped digits DiT -> sparsify -> brief fine-tune with the piece sampler -> sample the same seeds and
classes with both -> report (GMACs, measured throughput, FID on digits-CNN features, class accuracy,
image grid). Everything runs on CPU in minutes; every setting is written into the report.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsedit.checkpoint import atomic_write, load_pretrained, write_json
from sparsedit.diffusion import space_timesteps
from sparsedit.errors import SparseditError
from sparsedit.flops import schedule_macs
from sparsedit.images import make_grid, save_image
from sparsedit.metrics.digits import digits_score
from sparsedit.sampling import generate
from sparsedit.sparsify import sparsify
from sparsedit.train import Trainer, TrainSettings, open_dataset


@dataclass
class DemoSettings:
    """Every knob of the demo (all of them are printed in the report)."""

    out: str = "runs/demo"
    layout: str = "SparseDiT-B/2"
    r_min: float = 0.44
    r_max: float = 0.75
    finetune_steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-4
    ema_decay: float = 0.995
    samples_per_class: int = 20
    sampler: str = "ddim"
    sample_steps: int = 50
    cfg_scale: float = 3.0
    seed: int = 0
    timing_repeats: int = 3


def shipped_dit_path() -> Path:
    """The small pretrained digits DiT that ships with the package."""
    path = Path(str(resources.files("sparsedit") / "assets" / "digits_dit"))
    if not (path / "config.json").exists():
        raise SparseditError(f"the shipped digits DiT is missing from {path}; reinstall sparsedit")
    return path


def _timed_generate(model: nn.Module, labels: list[int], s: DemoSettings) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = generate(model, labels, sampler=s.sampler, steps=s.sample_steps, cfg_scale=s.cfg_scale, seed=s.seed,
                   progress=False)
    return out, time.perf_counter() - start


def measure_throughput(dit: nn.Module, sparse: nn.Module, labels: list[int], s: DemoSettings) -> dict[str, Any]:
    """Full sampling runs of both models, interleaved A B A B, in this one process; medians."""
    times: dict[str, list[float]] = {"dit": [], "sparsedit": []}
    for _ in range(s.timing_repeats):
        for name, model in (("dit", dit), ("sparsedit", sparse)):
            times[name].append(_timed_generate(model, labels, s)[1])
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    n = len(labels)
    return {
        "images": n, "repeats": s.timing_repeats, "seconds": times,
        "dit_images_per_sec": n / med["dit"], "sparsedit_images_per_sec": n / med["sparsedit"],
        "speedup": med["dit"] / med["sparsedit"],
    }


def run_demo(settings: DemoSettings | None = None, dit_path: str | Path | None = None, progress: bool = True,
             command: str | None = None) -> dict[str, Any]:
    """Run the whole demo; writes ``report.md``, ``report.json`` and ``grid.png`` into ``settings.out``."""
    s = settings or DemoSettings()
    out = Path(s.out)
    wall = time.perf_counter()
    log = print if progress else (lambda *a, **k: None)
    torch.manual_seed(s.seed)

    dit_dir = Path(dit_path) if dit_path else shipped_dit_path()
    dit = load_pretrained(dit_dir)
    log(f"[1/5] loaded DiT {dit_dir} ({sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M params)")

    sparse = sparsify(dit, layout=s.layout, r_min=s.r_min, r_max=s.r_max)
    log(f"[2/5] sparsified: layout {sparse.config.layout.as_string()}, r in [{s.r_min}, {s.r_max}]")

    dataset, info = open_dataset("digits", dit.config.latent_hw[0], dit.config.in_channels, s.seed)
    train_dir = out / "finetune"
    settings = TrainSettings(steps=s.finetune_steps, batch_size=s.batch_size, lr=s.lr, ema_decay=s.ema_decay,
                             seed=s.seed, ckpt_every=s.finetune_steps, keep_last=1, log_every=10)
    t0 = time.perf_counter()
    trainer = Trainer(sparse, dataset, train_dir, settings, run_info={"data": info, "source": {"demo": str(dit_dir)}},
                      device="cpu", progress=progress)
    model_dir = trainer.fit()
    finetune_s = time.perf_counter() - t0
    sparse = load_pretrained(model_dir)
    log(f"[3/5] fine-tuned {s.finetune_steps} steps in {finetune_s:.0f}s -> {model_dir}")

    classes = dit.config.num_classes
    labels = [c for c in range(classes) for _ in range(s.samples_per_class)]
    samples = {name: _timed_generate(m, labels, s)[0] for name, m in (("dit", dit), ("sparsedit", sparse))}
    scores = {name: digits_score(x.clamp(-1, 1), torch.tensor(labels)) for name, x in samples.items()}
    log(f"[4/5] sampled {len(labels)} images per model; scoring done")

    timing = measure_throughput(dit, sparse, list(range(classes)), s)
    timesteps = space_timesteps(1000, f"ddim{s.sample_steps}" if s.sampler == "ddim" else s.sample_steps)
    macs = {name: schedule_macs(m.config, timesteps) for name, m in (("dit", dit), ("sparsedit", sparse))}

    # Grid: first DiT row, then SparseDiT row; the same seed-0 sample of every class in each.
    first = [labels.index(c) for c in range(classes)]
    grid = make_grid(torch.cat([samples["dit"][first], samples["sparsedit"][first]]).clamp(-1, 1), nrow=classes)
    out.mkdir(parents=True, exist_ok=True)
    save_image(grid, out / "grid.png")

    report = {
        "settings": asdict(s),
        "command": command or "sparsedit demo",
        "source_model": str(dit_dir),
        "sparse_layout": sparse.config.layout.as_string(),
        "grids": [g["grid"] for g in macs["sparsedit"]["grids"]],
        "gmacs_per_forward": {k: v["gmacs"] for k, v in macs.items()},
        "gmacs_min_max_sparsedit": [macs["sparsedit"]["gmacs_min"], macs["sparsedit"]["gmacs_max"]],
        "flops_ratio": macs["dit"]["gmacs"] / macs["sparsedit"]["gmacs"],
        "throughput": timing,
        "quality": scores,
        "finetune_seconds": finetune_s,
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                        "threads": torch.get_num_threads(), "device": "cpu"},
        "wall_seconds": time.perf_counter() - wall,
    }
    write_json(out / "report.json", report)
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(render_report(report)))
    log(f"[5/5] wrote {out / 'report.md'} ({report['wall_seconds']:.0f}s in all)")
    return report


def render_report(r: dict[str, Any]) -> str:
    """The markdown report: the side-by-side table, the settings and the reproduce command."""
    g, q, th = r["gmacs_per_forward"], r["quality"], r["throughput"]
    s = r["settings"]
    rows = [
        ("GMACs per forward (mean under the schedule)", f"{g['dit']:.4f}", f"{g['sparsedit']:.4f}"),
        ("Sampling throughput (images/s, full run, measured here)", f"{th['dit_images_per_sec']:.2f}",
         f"{th['sparsedit_images_per_sec']:.2f}"),
        ("FID (digits-CNN features) vs embedded digits", f"{q['dit']['fid_digits_cnn']:.2f}",
         f"{q['sparsedit']['fid_digits_cnn']:.2f}"),
        ("Class accuracy (digits CNN)", f"{q['dit']['class_accuracy']:.3f}", f"{q['sparsedit']['class_accuracy']:.3f}"),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    settings = "\n".join(f"- `{k}`: {v}" for k, v in s.items())
    env = r["environment"]
    return f"""# sparsedit demo report

DiT (shipped digits model) vs SparseDiT (sparsified from it, fine-tuned {s['finetune_steps']} steps), same seeds
and classes. Quality is scored with a small CNN trained on the embedded digits: **FID (digits-CNN features)
is not ImageNet FID**; lower is better, and it is only comparable between rows of this table.

| | DiT | SparseDiT |
|---|---|---|
{table}

- FLOPs ratio (DiT / SparseDiT): **{r['flops_ratio']:.2f}x**; measured speed-up: **{th['speedup']:.2f}x**
  ({th['images']} images per run, median of {th['repeats']} interleaved runs, {s['sampler']} {s['sample_steps']}
  steps, CFG {s['cfg_scale']} which doubles the batch; batch = all images at once, fp32, CPU, not compiled).
- SparseDiT layout (P,K,g,s,r,d,T): {r['sparse_layout']}; sparse grids over the run: {r['grids']};
  GMACs range {r['gmacs_min_max_sparsedit'][0]:.4f} .. {r['gmacs_min_max_sparsedit'][1]:.4f}.
- Fine-tuning took {r['finetune_seconds']:.0f}s; the whole demo {r['wall_seconds']:.0f}s.
- Image grid: `grid.png` (top row DiT, bottom row SparseDiT; column = class; same seed).

## Settings

{settings}

Environment: Python {env['python']}, torch {env['torch']}, {env['platform']}, {env['threads']} threads, {env['device']}.

## Reproduce

```
{r['command']}
```
"""

