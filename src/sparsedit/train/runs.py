"""The run directory of a :class:`~sparsedit.train.trainer.Trainer`: checkpoints, resume and the metrics log.

The directory's layout is described in :mod:`sparsedit.train.trainer`. :class:`RunDirMixin` is the part of the
Trainer that checks and prepares the run directory, writes and loads checkpoints, resumes from the newest one that
loads and trims the metrics log; it works on the Trainer's attributes, declared at its top.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sparsedit.core.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write,
    config_from_dict,
    error_in_place_of,
    read_json,
    read_safetensors,
    replace_dir,
    write_json,
    write_safetensors,
)
from sparsedit.core.locking import LOCK_NAME
from sparsedit.errors import CheckpointError, SparseditError
from sparsedit.train.distributed import Dist
from sparsedit.train.lora import TRAINABLE_FILE, is_trainable, lora_scaling, merge_lora_state
from sparsedit.train.settings import TrainSettings

__all__ = ["LEGACY_SETTINGS", "METRICS_FILE", "RUN_FILE", "RunDirMixin", "list_checkpoints", "step_dir_name"]

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


def _config_fields(saved: dict[str, Any] | None) -> dict[str, Any] | None:
    """A model config saved in run.json, rebuilt so that fields added since (with defaults equal to the old
    behaviour, e.g. the SparseDiT recovery switches) compare equal to a fresh config's."""
    if saved is None:
        return None
    try:
        return json.loads(json.dumps(config_from_dict(saved).to_dict()))
    except SparseditError:
        return saved


# Settings added after runs were first written: a run.json without them was made with these values.
LEGACY_SETTINGS = {"lora_rank": 0, "lora_alpha": 0.0, "ema_warmup": False, "min_snr_gamma": 0.0, "diffusion_weight": 1.0, "distill_weight": 0.0,
                   "feature_weight": 0.0, "merge_lr_scale": 1.0, "data_free": 0}


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "trainer.json").exists())


def _rng_state(gen: torch.Generator) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state(), "generator": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]


def _save_tensors_pickle(obj: Any, path: Path) -> None:
    """``torch.save`` of a resume file, atomically. torch reports a failed write (a full disk) as a bare
    ``RuntimeError`` ("unexpected pos ..."): it is given back as the ``OSError`` it is, naming the file."""

    def write(tmp: Path) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:
            full = shutil.disk_usage(tmp.parent).free < 16 * 2**20
            code = errno.ENOSPC if full else errno.EIO
            raise OSError(code, os.strerror(code) if full else f"torch.save failed: {_first_line(err)}",
                          str(path)) from None

    atomic_write(path, write)


def _load_tensors_pickle(path: Path) -> Any:
    """``torch.load`` of a resume file with ``weights_only=True`` (tensors and plain containers, nothing
    executed); a missing, empty, truncated or foreign file is a :class:`CheckpointError`."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path} is damaged or not a sparsedit resume file ({_first_line(err)})") from None


def _set_rng_state(state: dict[str, Tensor], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RunDirMixin:
    """The run-directory methods of :class:`~sparsedit.train.trainer.Trainer` (its base class)."""

    # Set by Trainer.__init__ (and advanced by its loop); the methods below read and update them.
    run_dir: Path
    run_info: dict[str, Any]
    settings: TrainSettings
    dist: Dist
    config: Any
    model: nn.Module
    ema_wrapped: nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator
    step: int
    last_ckpt: Path | None
    lora_base: float | None  # a LoRA run's frozen-weight fingerprint (None: every weight trains)

    def _check_run_dir(self) -> None:
        """Refuse a run dir that holds another run or something else (reads only; see :meth:`_prepare_run_dir`)."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise SparseditError(f"the run directory {self.run_dir} is a file; choose a directory path")
        run_file = self.run_dir / RUN_FILE
        # A run that never wrote a checkpoint (it stopped on bad data, say) has nothing to resume: the corrected
        # command starts it afresh instead of being refused as "a different run".
        ckpts = self.run_dir / "checkpoints"
        if run_file.exists() and ckpts.is_dir() and any(p.name.startswith(("step_", "damaged-")) for p in ckpts.iterdir()):
            saved = read_json(run_file)
            saved["settings"] = {**LEGACY_SETTINGS, **saved.get("settings", {})}
            mine = json.loads(json.dumps(self.run_info))
            ignore = {"steps", "ckpt_every", "keep_last", "log_every", "sample_every", "num_workers", "tensorboard"}
            diff = sorted(
                k for k in set(saved.get("settings", {})) | set(mine["settings"])
                if k not in ignore and saved.get("settings", {}).get(k) != mine["settings"].get(k)
            )
            if _config_fields(saved.get("model")) != mine["model"]:
                diff.append("model config")
            if saved.get("data") != mine.get("data"):
                diff.append("data")
            if saved.get("teacher") != mine.get("teacher"):
                diff.append("teacher")
            if diff:
                raise SparseditError(f"{self.run_dir} holds a different run (differs in {', '.join(diff)}); use a new "
                                     "--run-dir, or repeat the original command to resume it")
        elif not run_file.exists() and self.run_dir.exists() and any(p.name != LOCK_NAME for p in self.run_dir.iterdir()):
            raise SparseditError(f"{self.run_dir} is not empty and is not a sparsedit run; choose a new --run-dir")

    def _prepare_run_dir(self) -> None:
        """Under the run lock: check again (another process may have started the run meanwhile), write
        ``run.json`` and remove what a killed process left half-written."""
        self._check_run_dir()
        self.dist.barrier()  # every rank has checked before rank 0 creates anything
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / RUN_FILE, self.run_info)
            # Temporary directories of a killed process; ours to remove, since we hold the lock.
            for stale in [*(self.run_dir / "checkpoints").glob(".step_*.tmp"), self.run_dir / ".model.tmp"]:
                shutil.rmtree(stale, ignore_errors=True)
        self.dist.barrier()

    # -- checkpoints ---------------------------------------------------------------------------

    def _full_state(self, module: nn.Module) -> dict[str, Tensor]:
        """The whole (unsharded) state dict on the CPU; a LoRA model's with its adapters, unmerged."""
        if self.settings.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.raw_of(module).state_dict().items()}

    def raw_of(self, module: nn.Module) -> nn.Module:
        return module.module if hasattr(module, "module") and not self.settings.fsdp else module

    def save_checkpoint(self) -> Path:
        """Write step dir atomically (temp dir + rename); keeps the last ``keep_last``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        root = self.run_dir / "checkpoints"
        final = root / step_dir_name(self.step)
        tmp = root / f".{final.name}.tmp"
        model_sd = self._full_state(self.model)
        ema_sd = self._full_state(self.ema_wrapped)
        trainable: dict[str, Tensor] = {}
        if self.lora_base is not None:  # checkpoints hold plain merged models; the adapters go beside them
            trainable = {f"{prefix}{k}": v for prefix, sd in (("model.", model_sd), ("ema.", ema_sd))
                         for k, v in sd.items() if is_trainable(k)}
            scaling = lora_scaling(self.settings.lora_rank, self.settings.lora_alpha)
            model_sd, ema_sd = merge_lora_state(model_sd, scaling), merge_lora_state(ema_sd, scaling)
        opt_sd = get_optimizer_state_dict(self.model, self.opt,
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        try:
            _save_tensors_pickle(_rng_state(self.gen), tmp / f"rng_rank{self.dist.rank}.pt")
            self.dist.barrier()
            if self.dist.main:
                for name, sd in (("model", model_sd), ("ema", ema_sd)):
                    (tmp / name).mkdir()
                    write_safetensors(tmp / name / WEIGHTS_NAME, sd, metadata={"format": "pt"})
                    write_json(tmp / name / CONFIG_NAME, self.config.to_dict())
                _save_tensors_pickle(opt_sd, tmp / "optimizer.pt")
                info: dict[str, Any] = {"step": self.step, "world_size": self.dist.world}
                if self.lora_base is not None:  # the adapters and merges, unmerged: what a resume loads
                    write_safetensors(tmp / TRAINABLE_FILE, trainable)
                    info["lora_base"] = self.lora_base
                write_json(tmp / "trainer.json", info)
                replace_dir(tmp, final)
        except OSError as err:  # a full disk, say: the earlier checkpoints stay, the half-written one goes
            if self.dist.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise error_in_place_of(err, tmp, final) from None
        except BaseException:
            if self.dist.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.dist.main:
            for old in list_checkpoints(self.run_dir)[: -self.settings.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        self.last_ckpt = final
        return final

    def load_checkpoint(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        info = read_json(path / "trainer.json")
        if not isinstance(info.get("step"), int) or step_dir_name(info["step"]) != path.name:
            raise CheckpointError(f"{path / 'trainer.json'} says step {info.get('step')!r}, not the step of {path.name}")
        if info.get("world_size") != self.dist.world:
            raise SparseditError(f"{path} was written by {info.get('world_size')} ranks, this run has {self.dist.world}; "
                                 "resume with the same number of processes")
        opts = StateDictOptions(full_state_dict=True)
        lora = self.lora_base is not None
        if lora:
            self._load_trainable(path, info)
        for module, name in (() if lora else ((self.model, "model"), (self.ema_wrapped, "ema"))):
            state = read_safetensors(path / name / WEIGHTS_NAME)
            try:
                if self.settings.fsdp:
                    set_model_state_dict(module, state, options=opts)
                else:
                    self.raw_of(module).load_state_dict(state)
            except (KeyError, RuntimeError, ValueError) as err:
                raise CheckpointError(f"{path / name / WEIGHTS_NAME} does not fit the model ({_first_line(err)})") from None
        opt_state = _load_tensors_pickle(path / "optimizer.pt")
        try:
            set_optimizer_state_dict(self.model, self.opt, opt_state, options=opts)
            _set_rng_state(_load_tensors_pickle(path / f"rng_rank{self.dist.rank}.pt"), self.gen)
            self.step = int(info["step"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path} holds a damaged optimizer or RNG state ({_first_line(err)})") from None
        self.last_ckpt = path

    def _load_trainable(self, path: Path, info: dict[str, Any]) -> None:
        """A LoRA run's resume: the adapters and merges from ``trainable.safetensors``; the frozen weights are the
        ones this run was started with, which must be those of the interrupted run."""
        base = self.lora_base
        assert base is not None
        if abs(float(info.get("lora_base", float("nan"))) - base) > 1e-6 * max(1.0, abs(base)):
            raise SparseditError(f"{path} was trained on other frozen weights than this run's model; resume with the same "
                                 "--init-from (and --layout) as the interrupted run")
        state = read_safetensors(path / TRAINABLE_FILE) if (path / TRAINABLE_FILE).exists() else None
        if state is None:
            raise CheckpointError(f"{path} has no {TRAINABLE_FILE}; the checkpoint is incomplete")
        for module, prefix in ((self.raw_of(self.model), "model."), (self.ema, "ema.")):
            params = dict(module.named_parameters())
            mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if set(mine) != {name for name in params if is_trainable(name)}:
                raise CheckpointError(f"{path / TRAINABLE_FILE} does not hold this run's adapters (rank or layout differ)")
            if self.settings.fsdp:  # sharded parameters: each rank takes its shard of the full tensors
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                set_model_state_dict(module, mine, options=StateDictOptions(full_state_dict=True, strict=False))
                continue
            with torch.no_grad():
                for name, value in mine.items():
                    params[name].copy_(value)

    def _resume(self) -> None:
        """Load the newest checkpoint that loads on every rank; damaged newer ones are moved aside, saying why."""
        skipped: list[str] = []
        for path in reversed(list_checkpoints(self.run_dir)):
            try:
                self.load_checkpoint(path)
                problem = ""
            except CheckpointError as err:
                problem = str(err)
            if self.dist.world > 1:  # every rank must resume from the same step
                ok = torch.tensor([0.0 if problem else 1.0], device=self.dist.device)
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
                problem = problem or ("" if ok.item() else "another rank could not load it")
            if not problem:
                if self.dist.main:
                    print(f"resuming {self.run_dir} from step {self.step} ({path.name})")
                self._truncate_metrics()
                return
            skipped.append(path.name)
            if self.dist.main:
                aside = path.with_name(f"damaged-{path.name}")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)  # out of the way of the next save and of keep_last
                print(f"warning: skipping checkpoint {path.name}: {problem}; moved it to {aside.name}")
            self.dist.barrier()
        if skipped:
            raise CheckpointError(f"no checkpoint in {self.run_dir / 'checkpoints'} loads (all moved aside as damaged-*); "
                                  "use a new --run-dir to start over")
        self._truncate_metrics()  # a fresh start: the log of a run that stopped before its first checkpoint goes

    def _truncate_metrics(self) -> None:
        """Drop log lines past the resumed step (they are logged again), and damaged ones: a process killed
        while appending leaves half a line."""
        path = self.run_dir / METRICS_FILE
        if not self.dist.main or not path.exists():
            return
        keep, damaged = [], 0
        for raw in path.read_bytes().splitlines():
            try:
                record = json.loads(raw.decode("utf-8"))
                step = record["step"] if isinstance(record, dict) else None
            except (UnicodeDecodeError, ValueError, KeyError):
                step = None
            if not isinstance(step, int):
                damaged += bool(raw.strip())
            elif step <= self.step:
                keep.append(raw.decode("utf-8"))
        if damaged:
            print(f"warning: dropped {damaged} damaged line(s) from {path}")
        atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in keep)))
