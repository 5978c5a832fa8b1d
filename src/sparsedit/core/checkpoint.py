"""sparsedit checkpoints: ``config.json`` + ``model.safetensors`` in a directory.

A checkpoint rebuilds its model with no flags: ``config.json`` names the ``model_type`` and holds
every constructor field. Writes are atomic (temp file + ``os.replace``) and never clobber a
directory that holds something else; reads never execute pickles.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
import shutil
import tempfile
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sparsedit.errors import CheckpointError, SparseditError, os_error_at

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Size fields of every diffusers transformer config we read: positive integers when present.
DIFFUSERS_SIZE_FIELDS = ("sample_size", "patch_size", "in_channels", "out_channels", "num_attention_heads",
                         "attention_head_dim", "num_layers")
# Names that are files, never the directory an output such as a checkpoint is (``--out model.pt`` is a mistake).
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz", ".npy", ".json", ".png", ".gif", ".txt")

# model_type -> (config class, model class), filled by sparsedit.families.register.
_MODEL_TYPES: dict[str, tuple[type, type[nn.Module]]] = {}


def register_model_type(name: str, config_cls: type, model_cls: type[nn.Module]) -> None:
    _MODEL_TYPES[name] = (config_cls, model_cls)


def model_types() -> dict[str, tuple[type, type[nn.Module]]]:
    # The family registry fills this table as it imports the families (imported by name: core does not depend on
    # the families, they depend on core).
    importlib.import_module("sparsedit.families").families()
    return _MODEL_TYPES


def config_from_dict(data: dict[str, Any], source: str = "config") -> Any:
    """Build the config dataclass named by ``data["model_type"]``, rejecting unknown fields."""
    types = model_types()
    kind = data.get("model_type")
    if kind not in types:
        raise CheckpointError(
            f"{source}: unknown model_type {kind!r}; expected one of {', '.join(sorted(types))} "
            "(is this a sparsedit checkpoint?)"
        )
    config_cls = types[kind][0]
    fields = {f.name for f in config_cls.__dataclass_fields__.values() if f.init}
    unknown = sorted(set(data) - fields - {"model_type"})
    if unknown:
        raise CheckpointError(
            f"{source}: unknown field(s) {', '.join(unknown)} for {kind}; the checkpoint was written by "
            "a newer or different sparsedit version"
        )
    missing = sorted(fields - set(data) - getattr(config_cls, "OPTIONAL_FIELDS", frozenset()))
    if missing:
        # A default would silently build another architecture (16 heads where the weights were trained with 4
        # give the same shapes and different outputs), so every field the checkpoint's writer knew is required.
        raise CheckpointError(
            f"{source}: missing field(s) {', '.join(missing)} for {kind}; the config file is incomplete: "
            "restore it from the checkpoint's source (sparsedit writes every field)"
        )
    values = {k: v for k, v in data.items() if k in fields}
    hints = typing.get_type_hints(config_cls)
    for name, value in values.items():
        if not _fits(value, hints.get(name, Any)):
            raise CheckpointError(f"{source}: field {name} must be {_describe(hints[name])}, got {value!r}; "
                                  "fix the value in the config file")
    try:
        return config_cls(**values)
    except (SparseditError, TypeError, ValueError, ZeroDivisionError) as err:  # the dataclass's own checks
        raise CheckpointError(f"{source}: invalid {kind} config: {err}") from None


def check_json_fields(cfg: dict[str, Any], source: str, positive_ints: tuple[str, ...] = (),
                      numbers: tuple[str, ...] = ()) -> None:
    """Types of another library's config.json (diffusers') before its values are used: a size that is a string or
    0 must be a one-line error naming the field, not a TypeError or ZeroDivisionError deep in a conversion."""
    for key in positive_ints:
        value = cfg.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise CheckpointError(f"{source}: {key} must be a positive integer, got {value!r}; fix the config file")
    for key in numbers:
        value = cfg.get(key)
        if value is not None and not _fits(value, float):
            raise CheckpointError(f"{source}: {key} must be a finite number, got {value!r}; fix the config file")


def _fits(value: Any, hint: Any) -> bool:
    """Does a JSON value fit a config field's annotation? ints are >= 0 (sizes and counts), floats finite."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list):
        items = [a for a in args if a is not Ellipsis]
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and Ellipsis not in args and len(value) != len(args):
            return False
        return all(_fits(v, items[0] if Ellipsis in args or origin is list else items[i]) for i, v in enumerate(value))
    return True  # nested or custom types: their own constructors check them


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    return {int: "an integer >= 0", float: "a finite number", bool: "true or false", str: "a string",
            type(None): "null"}.get(hint, str(hint).replace("typing.", ""))


def build_model(config: Any) -> nn.Module:
    """Instantiate the model class registered for ``config.model_type``."""
    return model_types()[config.model_type][1](config)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place."""
    made = make_parents(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # read-only, no permission: name the file asked for, not the temporary one
        raise os_error_at(err, path) from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is an ordinary readable file
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        remove_empty(made)
        if err.filename is None:  # a failed write() names no file: name the one the user asked for
            raise os_error_at(err, path) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        remove_empty(made)
        raise


def make_parents(path: Path) -> list[Path]:
    """Create the missing parent directories of ``path``; returns them, deepest first, for :func:`remove_empty`."""
    missing = [p for p in path.parents if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise os_error_at(err, path) from None
    return missing


def remove_empty(dirs: list[Path]) -> None:
    """Remove the directories a failed write created (deepest first), as long as they are still empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors writes its metadata from a hash map in a random order, so a file with two metadata keys
    # differs byte for byte between two saves of the same tensors. One key keeps checkpoints reproducible.
    if metadata is not None and len(metadata) > 1:
        raise ValueError(f"write_safetensors takes at most one metadata key (byte-reproducible files), got {sorted(metadata)}")
    # safetensors refuses shared or non-contiguous storage: give it private contiguous copies.
    flat = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        try:
            save_file(flat, str(tmp), metadata=metadata)
        except SafetensorError as err:
            raise _as_os_error(err, path) from None

    atomic_write(path, write)


def _as_os_error(err: SafetensorError, path: Path) -> Exception:
    """safetensors reports a failed write (a full disk, say) as ``SafetensorError: ... (os error 28)``; give it
    back as the ``OSError`` it is, naming the file, so callers handle it like any other failed write."""
    found = re.search(r"os error (\d+)", str(err))
    if found is None:
        return err
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def check_output_file(path: str, flag: str, suffixes: tuple[str, ...], overwrite: bool) -> Path:
    """An output file path a command may write: not a directory, one of ``suffixes``, not an existing file
    unless ``overwrite``. Checked before the work, so a refusal costs nothing and touches nothing."""
    out = Path(path)
    if out.is_dir():
        raise SparseditError(f"{flag} {out} is a directory; give a file name such as {out / ('samples' + suffixes[0])}")
    if out.suffix.lower() not in suffixes:
        raise SparseditError(f"{flag} {out} must end in {' or '.join(suffixes)}")
    if os.path.lexists(out) and not overwrite:  # lexists: a symbolic link, even a dangling one, is the user's too
        raise SparseditError(f"{flag} {out} already exists; pass --overwrite to replace it or choose another name")
    if out.exists() and not out.is_file():
        raise SparseditError(f"{flag} {out} is not a regular file (a pipe or a device?); choose another name")
    return out


def check_output_dir(out: str | Path, overwrite: bool = False, marker: str = CONFIG_NAME,
                     what: str = "checkpoint", owned: Iterable[str] = (CONFIG_NAME, WEIGHTS_NAME)) -> Path:
    """Refuse an output directory we must not write (creates nothing: checked before the work).

    An existing ``what`` (``marker`` present) is only replaced, whole, with ``overwrite``, and only when it
    holds nothing but the files named in ``owned`` (what the writer itself writes): replacing the directory
    would otherwise delete the user's other files. A non-empty directory that is not one is never touched.
    """
    out = Path(out)
    if out.suffix.lower() in FILE_SUFFIXES:
        raise SparseditError(f"output {out} looks like a file name, but a {what} is a directory; give a directory "
                             "path")
    if os.path.islink(out) and not out.exists():
        raise SparseditError(f"output {out} is a symbolic link to nothing (or a loop); remove it or choose another path")
    if out.exists() and not out.is_dir():
        raise SparseditError(f"output {out} exists and is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()):
        if not (out / marker).exists():
            raise SparseditError(f"output directory {out} is not empty and holds no {what}; choose a new path")
        if not overwrite:
            article = "an" if what[0] in "aeiou" else "a"
            raise SparseditError(f"{out} already holds {article} {what}; pass --overwrite to replace it or choose a new "
                                 "path")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in set(owned))
        if foreign:
            raise SparseditError(f"{out} holds files sparsedit did not write there ({_short(foreign, 3)}), which "
                                 "replacing it would delete; move them out or choose a new path")
    return out


def replace_dir(new: Path, out: Path) -> None:
    """Put the finished directory ``new`` at ``out``, replacing what is there as one unit.

    The old directory is first moved aside under a hidden name beside it, so at no moment does ``out``
    hold a mix of old and new files; a crash between the two renames leaves the old one in that
    hidden directory, never half of it.
    """
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)  # out is absent or an empty directory


def write_dir(out: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a new hidden directory beside ``out``, then :func:`replace_dir` it into place."""
    made = make_parents(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as err:
        remove_empty(made)
        raise os_error_at(err, out) from None
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; a checkpoint is an ordinary readable directory
        replace_dir(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(made)
        raise error_in_place_of(err, tmp, out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(made)
        raise


def error_in_place_of(err: OSError, tmp: Path, out: Path) -> OSError:
    """The error with the file it names moved from the temporary directory ``tmp`` to where the user asked for
    it, under ``out`` (a path inside a hidden ``.NAME.XXXX.tmp`` would only confuse)."""
    try:
        name = out / Path(err.filename).relative_to(tmp)
    except (TypeError, ValueError):
        return err
    return os_error_at(err, name)


def save_pretrained(model: nn.Module, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` as a sparsedit checkpoint directory; returns its path."""
    if not isinstance(model, nn.Module) or not hasattr(getattr(model, "config", None), "to_dict"):
        raise SparseditError(f"save_pretrained takes a sparsedit model (a module with a .config), not a "
                             f"{type(model).__name__}; load or build one with sparsedit.load_model")
    if not isinstance(overwrite, bool):
        raise SparseditError(f"overwrite must be True or False, not {overwrite!r}")
    out = check_output_dir(out, overwrite)
    state = {k: v for k, v in model.state_dict().items()}
    if any(v.is_meta for v in state.values()):
        raise SparseditError("the model's weights are on the meta device (shapes without values); load or initialise "
                             "them before saving")

    def write(tmp: Path) -> None:
        write_safetensors(tmp / WEIGHTS_NAME, state, metadata={"format": "pt"})
        write_json(tmp / CONFIG_NAME, model.config.to_dict())

    write_dir(out, write)  # all or nothing: an old checkpoint at out is replaced whole or kept whole
    return out


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror}; check the path and permissions") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); the file is corrupt") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text, so not a JSON config; the file is corrupt") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; the file is corrupt")
    return data


@contextlib.contextmanager
def openable(path: str | Path) -> Iterator[str]:
    """A path string the safetensors library can open, for the body of the ``with``.

    safetensors takes paths as UTF-8 only, but Linux file names are bytes: a name that is not valid UTF-8
    is opened here and handed over as ``/proc/self/fd/N``, which names the same file in ASCII.
    """
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        if not os.path.isdir("/proc/self/fd"):
            raise SparseditError(f"{text!r}: the path is not valid UTF-8, which safetensors cannot open; rename it") from None
        fd = os.open(path, os.O_RDONLY)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    yield text


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with openable(path) as name:
            return load_file(name)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint directory is incomplete") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path} ({err}); the file is truncated or not safetensors") from None


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``: every key consumed, every parameter filled, shapes equal."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    # An integer tensor where the model has floats would be cast silently: the file is damaged or not weights.
    kinds = sorted(k for k in set(expected) & set(state)
                   if expected[k].is_floating_point() and not state[k].is_floating_point())
    problems = []
    if kinds:
        problems.append("non-float tensors " + _short([f"{k} ({state[k].dtype})" for k in kinds]))
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if wrong:
        problems.append(
            "shape mismatch " + _short([f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong])
        )
    if problems:
        raise CheckpointError(f"{source} does not match the model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def _short(items: list[str], limit: int = 6) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_pretrained(path: str | Path) -> nn.Module:
    """Rebuild a model from a sparsedit checkpoint directory."""
    path = Path(path)
    config = config_from_dict(read_json(path / CONFIG_NAME), source=str(path / CONFIG_NAME))
    model = build_model(config)
    load_state_strict(model, read_safetensors(path / WEIGHTS_NAME), str(path / WEIGHTS_NAME))
    return model.eval()
