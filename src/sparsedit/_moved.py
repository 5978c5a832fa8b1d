"""Deprecated import paths: modules that moved when the package was split into core / families / diffusion /
train / eval / cli keep working under their old names, with a DeprecationWarning.

``import sparsedit.dit`` (or ``python -m sparsedit.commands.sample_fid``) gives the module object now at its new
path, so attributes, monkeypatching and ``-m`` behave as before. A module whose contents went to several new
modules is a stand-in that looks its attributes up in them, in order.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import CodeType, ModuleType

# old path -> new path (kept for the import paths the 0.1 docs showed)
MOVED: dict[str, str | tuple[str, ...]] = {
    "sparsedit.dit": "sparsedit.families.dit",
    "sparsedit.sparse_dit": ("sparsedit.families.dit.sparse", "sparsedit.core.layout"),
    "sparsedit.sparsify": "sparsedit.families.dit.sparsify",
    "sparsedit.convert": ("sparsedit.loading", "sparsedit.families.dit.convert", "sparsedit.core.formats"),
    "sparsedit.authors": "sparsedit.families.dit.authors",
    "sparsedit.pixart": "sparsedit.families.pixart",
    "sparsedit.pixart_convert": "sparsedit.families.pixart.convert",
    "sparsedit.latte": "sparsedit.families.latte",
    "sparsedit.presets": "sparsedit.families.presets",
    "sparsedit.layers": "sparsedit.core.layers",
    "sparsedit.blocks": "sparsedit.core.blocks",
    "sparsedit.schedule": "sparsedit.core.schedule",
    "sparsedit.checkpoint": "sparsedit.core.checkpoint",
    "sparsedit.images": "sparsedit.core.images",
    "sparsedit.samplers": "sparsedit.diffusion.samplers",
    "sparsedit.sampling": "sparsedit.diffusion.sampling",
    "sparsedit.vae": "sparsedit.encoders.vae",
    "sparsedit.text": "sparsedit.encoders.text",
    "sparsedit.data": "sparsedit.train.data",
    "sparsedit.distill": "sparsedit.train.distill",
    "sparsedit.flops": "sparsedit.eval.flops",
    "sparsedit.bench": "sparsedit.eval.bench",
    "sparsedit.analyze": "sparsedit.eval.analyze",
    "sparsedit.compare": "sparsedit.eval.compare",
    "sparsedit.sample_fid": "sparsedit.eval.sample_fid",
    "sparsedit.demo": "sparsedit.eval.demo",
    "sparsedit.metrics": "sparsedit.eval.metrics",
    "sparsedit.metrics.adm": "sparsedit.eval.metrics.adm",
    "sparsedit.metrics.digits": "sparsedit.eval.metrics.digits",
    "sparsedit.metrics.inception": "sparsedit.eval.metrics.inception",
    "sparsedit.metrics.stats": "sparsedit.eval.metrics.stats",
    "sparsedit.commands": "sparsedit.cli",
    **{f"sparsedit.commands.{name}": f"sparsedit.cli.{name}" for name in (
        "analyze", "bench", "common", "compare", "convert", "demo", "eval", "extract_latents", "flops", "sample",
        "sample_fid", "sparsify", "train")},
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str | tuple[str, ...]):
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # a placeholder: exec_module swaps the real module in, or fills the stand-in

    def exec_module(self, module: ModuleType) -> None:
        where = self.new if isinstance(self.new, str) else " / ".join(self.new)
        warnings.warn(f"{module.__name__} moved to {where}; import it from there", DeprecationWarning, stacklevel=2)
        if isinstance(self.new, str):
            sys.modules[module.__name__] = importlib.import_module(self.new)
            return
        targets = [importlib.import_module(name) for name in self.new]

        def lookup(attr: str) -> object:
            for target in targets:
                if hasattr(target, attr):
                    return getattr(target, attr)
            raise AttributeError(f"module {module.__name__!r} has no attribute {attr!r}")

        module.__getattr__ = lookup  # type: ignore[method-assign]

    def get_code(self, fullname: str) -> CodeType | None:  # ``python -m OLD`` runs the new module's code
        if not isinstance(self.new, str):
            return None
        spec = importlib.util.find_spec(self.new)
        return spec.loader.get_code(self.new) if spec and spec.loader else None  # type: ignore[attr-defined]


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        is_package = any(k.startswith(fullname + ".") for k in MOVED)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new), is_package=is_package)


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())  # before the path finder, which would load a 2nd copy
