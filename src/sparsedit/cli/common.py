"""Argument helpers shared by several sub-commands."""

from __future__ import annotations

import argparse
import errno
import io
import math
import os
import shlex
import signal
import sys
import threading
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparsedit.errors import SparseditError


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose refusals are one line, like every other sparsedit error.

    argparse prints its usage block above the error; a mistyped flag then scrolls the one line that
    matters out of view. Here the error names the command and points at ``--help`` instead. Sub-command
    parsers inherit the class (argparse creates them with the parent's type).
    """

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")

    def subparser(self, name: str) -> argparse.ArgumentParser:
        """The parser of sub-command ``name``."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices[name]
        raise KeyError(name)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extra = super().parse_known_args(args, namespace)
        if any(action.dest == "cfg_mode" for action in self._actions):
            scales = getattr(parsed, "cfg_scales", None) or [getattr(parsed, "cfg_scale", 1.0)]
            if parsed.cfg_mode is None:
                parsed.cfg_mode = "first3"  # the official DiT's
            elif all(scale == 1 for scale in scales):
                self.error("argument --cfg-mode: guidance is off (a CFG scale of 1), so there is nothing to guide; set "
                           "a CFG scale or drop --cfg-mode")
        for action in self._actions:
            value = getattr(parsed, action.dest, None)
            if action.dest in PATH_ARGS and isinstance(value, str) and not value.strip():
                # "" would quietly become the current directory (and, say, train on everything in it).
                name = action.option_strings[0] if action.option_strings else action.metavar or action.dest
                self.error(f"argument {name}: an empty path or name")
        return parsed, extra


# Arguments that name a file, a directory or a preset: an empty string is never one.
PATH_ARGS = ("ckpt", "src", "out", "data", "vae", "run_dir", "init_from", "teacher", "pack", "ref", "real", "samples",
             "inception_weights", "t5", "prompt_embeds", "cache_dir", "dit", "sparse_out", "a", "b", "model", "layout",
             "pipeline", "prompts_file", "i3d")


def add_model_args(parser: argparse.ArgumentParser, flag: str = "--ckpt") -> None:
    kw = {"required": True} if flag.startswith("-") else {}
    parser.add_argument(flag, **kw, metavar="PATH",
                        help="official DiT .pt, SparseDiT authors' .pt, diffusers DiTTransformer2DModel directory, or "
                        "sparsedit directory")
    parser.add_argument("--model", default=None, metavar="PRESET",
                        help="preset such as DiT-XL/2, only when the checkpoint cannot tell")
    parser.add_argument("--image-size", type=int, default=None, help="image size in pixels, only when the checkpoint cannot tell")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")


def default_threads() -> int:
    """Torch intra-op threads for a CPU run: every CPU only when the machine is idle.

    ``max(1, min(cpus, cpus - round(load)))`` with ``load`` the 1-minute load average. Threads beyond the
    idle cores wait for cores other processes hold, and torch's pool then stalls: on a loaded 2-core
    machine two threads can run 10x slower than one. Where there is no load average (Windows): every CPU.
    """
    cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cpus
    return max(1, min(cpus, cpus - round(load)))


def command_line(argv: list[str]) -> str:
    """The command as a user would type it again (for reports): ``sparsedit demo --out x``."""
    return "sparsedit " + " ".join(shlex.quote(a) for a in argv)


def check_not_source(src: str, out: str) -> None:
    """Refuse an output that is the input: ``--overwrite`` would replace the checkpoint being converted."""
    a, b = Path(os.path.realpath(src)), Path(os.path.realpath(out))  # realpath: a symbolic link loop is no error here
    if a == b or a.is_relative_to(b):
        raise SparseditError(f"the output {out} is (or holds) the source {src}; writing there would destroy the model "
                             "being read: choose another output path")


def check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SparseditError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparseditError("--device cuda was requested but no CUDA GPU is available; use --device cpu")
    return device


def load_cli_model(path: str, args: argparse.Namespace, **kwargs: Any) -> Any:
    """:func:`sparsedit.loading.load_model` with the command's ``--model`` / ``--image-size``.

    Those flags are for single files that cannot tell their architecture or size (official ``.pt``). A
    directory whose config.json says both would silently ignore them, so there they must agree with it.
    """
    from sparsedit.encoders.vae import VAE_DOWNSAMPLE
    from sparsedit.loading import detect_format, load_model

    model = load_model(path, model=args.model, image_size=args.image_size, **kwargs)
    if detect_format(Path(path)) == "official":
        return model
    if args.model is not None:
        raise SparseditError(f"--model {args.model}: {path} names its own architecture in config.json; drop --model "
                             "(it is for .pt files that cannot tell)")
    if args.image_size is not None:
        cfg = model.config
        factor = VAE_DOWNSAMPLE if cfg.data_space == "latent" else 1
        h, w = (side * factor for side in cfg.latent_hw)
        if (h, w) != (args.image_size, args.image_size):
            raise SparseditError(f"--image-size {args.image_size}: {path} is a {h}x{w} model (its config.json says "
                                 "so); drop --image-size")
    return model


def vae_for(model: Any, path: str | None, device: str | torch.device) -> Any:
    """The VAE a model's samples need: loaded from ``path`` for a latent-space model (its own error when
    missing), None for a pixel-space one, which refuses a ``--vae`` rather than silently ignoring it."""
    if model.config.data_space != "latent":
        if path is not None:
            raise SparseditError(f"this {type(model).__name__} works in pixel space and needs no VAE: drop --vae")
        return None
    from sparsedit.families import family_of

    return family_of(model).load_vae(path, device)


def _number(text: str, cast: type[int] | type[float], ok: Callable[[float], bool], rule: str) -> Any:
    """argparse ``type=``: ``cast(text)`` if ``ok`` accepts it, else an error naming ``rule``."""
    try:
        value = cast(text)
    except ValueError:
        kind = "an integer" if cast is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
    if cast is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{rule}, got {value}")
    return value


def finite_float(text: str) -> float:
    return _number(text, float, lambda v: True, "must be a finite number")


def unit_float(text: str) -> float:
    """A number in [0, 1] (a decay, a probability)."""
    return _number(text, float, lambda v: 0 <= v <= 1, "must be in [0, 1]")


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "must be > 0")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "must be >= 0")


def seed(text: str) -> int:
    """A random seed: torch takes integers in [0, 2**63) (a larger one overflows deep inside it)."""
    return _number(text, int, lambda v: 0 <= v < 2**63, "a seed must be in [0, 2**63)")


def threads(text: str) -> int:
    """A torch thread count: 0 (automatic, where a command allows it) up to the machine's CPUs. Far more threads
    than CPUs only slow torch down, and tens of thousands crash its thread pool."""
    cpus = os.cpu_count() or 1
    return _number(text, int, lambda v: 0 <= v <= cpus, f"must be in [0, {cpus}] (this machine's CPUs)")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "must be > 0")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: v >= 0, "must be >= 0")


def rate(text: str) -> float:
    """A pruning rate, in [0, 1)."""
    return _number(text, float, lambda v: 0 <= v < 1, "a pruning rate must be in [0, 1)")


def add_sampling_args(parser: argparse.ArgumentParser, cfg_scale: float | None, cfg_scale_help: str,
                      family_defaults: bool = False) -> None:
    """--steps, --sampler, --eta, --cfg-scale and --cfg-mode of the commands that sample with :func:`generate`;
    ``family_defaults``: --steps / --sampler default to None, for the model's family to fill in."""
    from sparsedit.diffusion.samplers import SAMPLERS
    from sparsedit.families.dit.model import CFG_MODES

    if family_defaults:
        parser.add_argument("--steps", type=positive_int, default=None,
                            help="sampling steps (default: 250 for DDPM models; SD3 28, FLUX.1-dev 28, schnell 4)")
        parser.add_argument("--sampler", choices=(*SAMPLERS, "euler"), default=None,
                            help="default ddpm; euler (the only one) for the flow-matching SD3 / FLUX.1")
    else:
        parser.add_argument("--steps", type=positive_int, default=250, help="sampling steps (default 250)")
        parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    parser.add_argument("--eta", type=non_negative_float, default=0.0, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--cfg-scale", type=finite_float, default=cfg_scale, help=cfg_scale_help)
    parser.add_argument("--cfg-mode", choices=CFG_MODES, default=None,
                        help="guide the first 3 latent channels (official DiT) or all channels")


class Terminated(BaseException):
    """SIGTERM (``kill PID``, a scheduler's time limit), raised so that half-written outputs are cleaned up on the way
    out as after Ctrl-C; a BaseException like KeyboardInterrupt, so no ``except Exception`` swallows it."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def run_command(args: argparse.Namespace) -> int:
    """Call the parsed sub-command: its exit code, 2 after a one-line user error, 130 on Ctrl-C, 143 on SIGTERM."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    for stream in (sys.stdout, sys.stderr):
        # A file name that is not valid UTF-8 (Linux names are bytes) must not crash a "wrote PATH" line:
        # such characters are printed as escapes instead.
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        code = args.func(args)
    except SparseditError as err:
        print(f"sparsedit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsedit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"sparsedit {args.command}: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:
        # The reader of our stdout went away (`sparsedit flops --json | head`): stop quietly, like a tool killed
        # by SIGPIPE, and point stdout at /dev/null so the interpreter's final flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:  # read-only place, wrong kind of path, disk full, no permission: the user's to fix
        print(f"sparsedit {args.command}: error: {os_error_message(err)}", file=sys.stderr)
        return 2
    return int(code or 0)


_OS_FIXES = {
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.EACCES: "permission denied; choose a location you can write to or fix its permissions",
    errno.EPERM: "operation not permitted; choose a location you can write to or fix its permissions",
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere (earlier files are kept)",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere (earlier files are kept)",
    errno.EISDIR: "is a directory where a file was expected; give a file path",
    errno.ENOTDIR: "a part of the path is a file where a directory was expected; give a directory path",
    errno.EEXIST: "already exists as another kind of path; choose another name",
    errno.ENOENT: "does not exist; check the path",
}


def os_error_message(err: OSError) -> str:
    """One line for an operating-system error: the path, what went wrong and what to do."""
    path = err.filename if err.filename is not None else "(no path)"
    fix = _OS_FIXES.get(err.errno or -1, f"{err.strerror or err}; check the path")
    return f"{path}: {fix}"
