"""Sampling many class-balanced images for FID, sharded, resumable, packed into an ADM ``.npz``.

The ``N`` samples are numbered ``0 .. N-1``. Everything about sample ``i`` is a pure function of the
settings, never of the number of processes or of earlier interruptions:

* its class label is ``i % num_classes`` (:func:`balanced_labels`): every class gets ``N // C`` or
  ``N // C + 1`` samples, the first ``N % C`` classes one more;
* it belongs to shard ``k = i // batch_size``: shard ``k`` holds samples
  ``k*B .. min((k+1)*B, N) - 1`` (the last shard may be partial) and is generated as one batch;
* shard ``k``'s noise comes from the seed :func:`shard_seed` ``(seed, k)``, fed to
  :func:`sparsedit.diffusion.sampling.generate`.

Finished shards are written atomically to ``OUT/shards/shard_{k:06d}.npz`` (``images``: uint8
NHWC with the model's 1 or 3 channels, ``labels``: int64). A re-run skips the shards that exist.
``OUT/manifest.json`` records the settings that determine the samples (sampling arguments, model
config and a SHA-256 of the weights, of the VAE weights for latent models); a run whose settings
differ from the manifest is refused, so shards from different settings are never mixed. Finally
rank 0 packs the shards, in order, into an ADM batch (``arr_0``: (N, H, W, 3) uint8, 1-channel images
repeated to 3 channels; ``arr_1``: labels) with :func:`sparsedit.eval.metrics.adm.save_sample_batch`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsedit.core.locking import LOCK_NAME, run_lock
from sparsedit.errors import SparseditError, os_error_at

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
MANIFEST_FORMAT = 1
LABEL_RULE = "label(i) = i % num_classes"
SEED_RULE = "seed(k) = int.from_bytes(sha256(f'sparsedit-sample-fid:{seed}:{k}')[:8], 'little') >> 1"


@dataclass(frozen=True)
class FidSampling:
    """What to sample; with the model (and VAE) it fully determines every shard."""

    num_samples: int
    batch_size: int
    steps: int = 250
    sampler: str = "ddpm"
    eta: float = 0.0
    cfg_scale: float = 1.5
    cfg_mode: str = "first3"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise SparseditError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.batch_size < 1:
            raise SparseditError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.steps < 1:
            raise SparseditError(f"--steps must be >= 1, got {self.steps}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def shard_range(self, k: int) -> tuple[int, int]:
        """Global sample indices ``[start, stop)`` of shard ``k``."""
        if not 0 <= k < self.num_shards:
            raise SparseditError(f"shard {k} does not exist; there are {self.num_shards} shards (0..{self.num_shards - 1})")
        start = k * self.batch_size
        return start, min(start + self.batch_size, self.num_samples)


def balanced_labels(start: int, stop: int, num_classes: int) -> np.ndarray:
    """Class labels of global samples ``start .. stop-1``: ``i % num_classes`` (int64)."""
    return np.arange(start, stop, dtype=np.int64) % num_classes


def shard_seed(seed: int, k: int) -> int:
    """The generator seed of shard ``k``: a 63-bit hash of ``(seed, k)``, stable across platforms."""
    digest = hashlib.sha256(f"sparsedit-sample-fid:{seed}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def shard_path(out_dir: str | os.PathLike[str], k: int) -> Path:
    return Path(out_dir) / SHARDS_DIR / f"shard_{k:06d}.npz"


def default_pack_path(out_dir: str | os.PathLike[str], num_samples: int) -> Path:
    return Path(out_dir) / f"samples_{num_samples}.npz"


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes and raw bytes, in sorted name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# manifest


def manifest_settings(
    model: nn.Module, spec: FidSampling, model_sha256: str | None = None, vae_sha256: str | None = None
) -> dict[str, Any]:
    """The manifest's ``settings``: everything that determines the shards' content."""
    cfg = model.config
    return {
        **dataclasses.asdict(spec),
        "num_classes": int(cfg.num_classes),
        "label_rule": LABEL_RULE,
        "seed_rule": SEED_RULE,
        "model_config": cfg.to_dict(),
        "model_sha256": model_sha256 if model_sha256 is not None else weights_sha256(model),
        "vae_sha256": vae_sha256,
    }


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def check_manifest(path: Path, settings: dict[str, Any]) -> None:
    """Raise a one-line :class:`SparseditError` unless ``path`` records exactly ``settings``."""
    try:
        saved = json.loads(path.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SparseditError(f"{path} is unreadable ({err}); delete {path.parent} or use another --out") from None
    if saved == settings:
        return
    diffs = []
    for key in sorted(set(saved) | set(settings)):
        if saved.get(key) != settings.get(key):
            if key == "model_config" or key.endswith("sha256"):
                diffs.append(f"{key} differs")
            else:
                diffs.append(f"{key} {_short(saved.get(key))} there, {_short(settings.get(key))} now")
    raise SparseditError(
        f"{path.parent} holds shards sampled with other settings ({'; '.join(diffs)}); "
        "re-run with the original settings to resume, or use another --out"
    )


def write_manifest(path: Path, settings: dict[str, Any], info: dict[str, Any] | None = None) -> None:
    from sparsedit.core.checkpoint import atomic_write

    text = json.dumps({"format": MANIFEST_FORMAT, "settings": settings, "info": info or {}}, indent=2, sort_keys=True)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


# --------------------------------------------------------------------------------------------------
# shards


def sample_shard(
    model: nn.Module,
    spec: FidSampling,
    k: int,
    vae: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Generate shard ``k``: (n, H, W, C) uint8 images (C = the model's 1 or 3 channels) and labels."""
    from sparsedit.core.images import to_uint8
    from sparsedit.diffusion.sampling import generate, to_images

    start, stop = spec.shard_range(k)
    labels = balanced_labels(start, stop, model.config.num_classes)
    out = generate(
        model, torch.from_numpy(labels), sampler=spec.sampler, steps=spec.steps, eta=spec.eta,
        cfg_scale=spec.cfg_scale, cfg_mode=spec.cfg_mode, seed=shard_seed(spec.seed, k), device=device,
        progress=False,
    )
    return to_uint8(to_images(model, out, vae)), labels


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one shard atomically (temporary file in the same folder, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, images=images, labels=labels)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:  # a full disk: name the shard (the failed write() names no file)
        Path(tmp).unlink(missing_ok=True)
        raise os_error_at(err, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_shard(path: Path, spec: FidSampling, k: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Load shard ``k`` and check it holds the expected samples; one-line error otherwise."""
    start, stop = spec.shard_range(k)
    hint = f"delete {path} and re-run to sample it again"
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"]
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise SparseditError(f"{path} is unreadable ({str(err).splitlines()[0][:120]}); {hint}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != stop - start or images.shape[-1] not in (1, 3):
        raise SparseditError(
            f"{path} holds images of shape {images.shape} {images.dtype}, expected ({stop - start}, H, W, 1 or 3) uint8; {hint}"
        )
    if not np.array_equal(labels, balanced_labels(start, stop, num_classes)):
        raise SparseditError(f"{path} has the wrong class labels for samples {start}..{stop - 1}; {hint}")
    return images, labels


def _reserve(path: Path, target: Path) -> None:
    """Allocate the whole of a freshly created (sparse) file now. Writing a memory map past the end of a full
    disk kills the process with SIGBUS; allocating first turns that into an ``OSError`` naming ``target``."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        raise os_error_at(err, target) from None
    finally:
        os.close(fd)


def finished_shards(out_dir: str | os.PathLike[str], spec: FidSampling) -> list[int]:
    return [k for k in range(spec.num_shards) if shard_path(out_dir, k).is_file()]


def pack_shards(
    out_dir: str | os.PathLike[str], spec: FidSampling, num_classes: int, out: str | os.PathLike[str] | None = None
) -> Path:
    """Concatenate all shards, in order, into an ADM batch; returns its path.

    The image array is assembled in a temporary memory-mapped ``.npy`` next to the output, so
    packing 50k images does not need them all in RAM (but needs their size twice on disk briefly).
    """
    from sparsedit.eval.metrics.adm import save_sample_batch

    out_dir = Path(out_dir)
    target = Path(out) if out is not None else default_pack_path(out_dir, spec.num_samples)
    missing = [k for k in range(spec.num_shards) if not shard_path(out_dir, k).is_file()]
    if missing:
        shown = ", ".join(str(k) for k in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise SparseditError(f"{len(missing)} shard(s) missing in {out_dir / SHARDS_DIR} ({shown}); re-run to finish them")
    first, _ = read_shard(shard_path(out_dir, 0), spec, 0, num_classes)
    _, h, w, _ = first.shape
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".npy", dir=target.parent)
    os.close(fd)
    try:
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(spec.num_samples, h, w, 3))
        _reserve(Path(tmp), target)
        labels = np.empty(spec.num_samples, dtype=np.int64)
        for k in range(spec.num_shards):
            start, stop = spec.shard_range(k)
            arr, lab = (first, None) if k == 0 else read_shard(shard_path(out_dir, k), spec, k, num_classes)
            if arr.shape[1:3] != (h, w):
                raise SparseditError(
                    f"{shard_path(out_dir, k)} holds {arr.shape[1]}x{arr.shape[2]} images, shard 0 {h}x{w}; "
                    f"delete {shard_path(out_dir, k)} and re-run to sample it again"
                )
            images[start:stop] = arr  # a 1-channel shard broadcasts to 3 channels
            labels[start:stop] = balanced_labels(start, stop, num_classes) if lab is None else lab
        images.flush()
        path = save_sample_batch(target, images, labels)
        del images
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------------
# the whole run


def _wait_for(paths: list[Path], poll_s: float) -> None:
    while True:
        if all(p.is_file() for p in paths):
            return
        time.sleep(poll_s)


def sample_fid(
    model: nn.Module,
    spec: FidSampling,
    out_dir: str | os.PathLike[str],
    *,
    vae: nn.Module | None = None,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    pack: str | os.PathLike[str] | None = None,
    settings: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    progress: bool = True,
    poll_s: float = 2.0,
) -> Path | None:
    """Sample the shards this rank owns (skipping finished ones), then pack on rank 0.

    Every rank calls this with the same arguments (``barrier`` synchronises them, e.g.
    :meth:`sparsedit.train.trainer.Dist.barrier`). Returns the packed ``.npz`` path on rank 0, ``None`` on
    the others. ``settings`` defaults to :func:`manifest_settings` (pass it precomputed to hash the
    weights only once, before moving the model to the device).
    """
    cfg = model.config
    if cfg.data_space == "pixel" and cfg.in_channels not in (1, 3):
        raise SparseditError(
            f"this pixel-space model makes {cfg.in_channels}-channel images; FID needs 1- or 3-channel images"
        )
    if spec.cfg_scale != 1.0 and cfg.class_dropout_prob <= 0:
        raise SparseditError("this model was trained without a null class, so --cfg-scale must be 1")
    if cfg.data_space == "latent" and vae is None:
        from sparsedit.encoders.vae import load_vae

        load_vae(None)  # raises the "needs --vae" error
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SparseditError(f"--out {out_dir} is a file; give a directory for the run (manifest, shards, packed .npz)")
    # Rank 0 only: the other ranks would race its first writes (a temporary manifest) into the folder.
    if (rank == 0 and out_dir.is_dir() and not (out_dir / MANIFEST_NAME).exists()
            and not (out_dir / SHARDS_DIR).is_dir() and any(p.name != LOCK_NAME for p in out_dir.iterdir())):
        raise SparseditError(f"--out {out_dir} is not empty and is not a sample-fid run folder (it has no "
                             f"{MANIFEST_NAME}); choose a new or empty --out")
    # One process per run folder (rank 0 holds the lock for all ranks): two would sample the same shards.
    with run_lock(out_dir, "--out") if rank == 0 else contextlib.nullcontext():
        manifest = out_dir / MANIFEST_NAME
        shards = out_dir / SHARDS_DIR
        if settings is None:
            settings = manifest_settings(model, spec)
        if rank == 0:
            has_shards = shards.is_dir() and any(shards.glob("shard_*.npz"))
            if has_shards and not manifest.exists():
                raise SparseditError(
                    f"{shards} holds shards but {manifest} is missing, so their settings are unknown; "
                    "delete them or use another --out"
                )
            if not has_shards:  # nothing to mix up yet: (re)start with these settings
                write_manifest(manifest, settings, info)
            shards.mkdir(parents=True, exist_ok=True)
            for stale in shards.glob(".shard_*.tmp"):  # left by a killed run
                stale.unlink(missing_ok=True)
        barrier()
        check_manifest(manifest, settings)
        pending = [k for k in range(spec.num_shards) if not shard_path(out_dir, k).is_file()]
        barrier()  # every rank has listed the same pending shards before anyone writes one
        mine = pending[rank::world]
        bar = None
        if progress and rank == 0 and pending:
            from tqdm.auto import tqdm

            bar = tqdm(total=spec.num_shards, initial=spec.num_shards - len(pending), unit="shard",
                       desc="sample-fid", file=sys.stderr)
        try:
            with torch.no_grad():
                for i, k in enumerate(mine):
                    images, labels = sample_shard(model, spec, k, vae, device)
                    write_shard(shard_path(out_dir, k), images, labels)
                    if bar is not None:  # all ranks finish a round of `world` shards at about the same time
                        bar.update(min(world, len(pending) - i * world))
        finally:
            if bar is not None:
                bar.close()
        if rank != 0:
            return None
        # Rank 0 waits for the other ranks' shards on the file system rather than in a collective
        # barrier, whose timeout (10 min for NCCL) a slow last shard could exceed.
        _wait_for([shard_path(out_dir, k) for k in pending], poll_s)
        return pack_shards(out_dir, spec, cfg.num_classes, pack)
