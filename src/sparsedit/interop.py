"""Drop sparsedit models into diffusers pipelines with one call.

Each wrapper gives a sparsedit model the face of the diffusers transformer a pipeline expects: the
call signature, the ``config`` attributes the pipeline reads, ``dtype`` / ``device``, and the output
container (``.sample`` or a 1-tuple, holding every output channel: pipelines split off the learned
variance themselves).

* ``DiTPipeline``: :class:`~sparsedit.families.dit.face.DiffusersDiT` (diffusers' ``DiTTransformer2DModel``) for a DiT or SparseDiT;
* ``PixArtAlphaPipeline``: :class:`~sparsedit.families.pixart.face.DiffusersPixArt` (``PixArtTransformer2DModel``) for a PixArt or
  SparsePixArt;
* ``LattePipeline``: :class:`~sparsedit.families.latte.face.DiffusersLatte` (``LatteTransformer3DModel``) for a text-conditional Latte
  or SparseLatte.

A sparse model picks its sparse grid from the timestep the scheduler passes: DDPM/DDIM/DPM-Solver
schedulers pass integer training timesteps, flow-matching schedulers ``sigma * 1000``, and
fractional or noise-end timesteps map to the schedule by :func:`sparsedit.core.schedule.discrete_timestep`::

    pipe = PixArtAlphaPipeline.from_pretrained("path/to/PixArt-XL-2-512x512")    # local directory
    sparsedit.interop.use_in_pipeline(pipe, sparsedit.load_model("path/to/sparse-pixart"))
    image = pipe("a small cactus with a happy face", num_inference_steps=20).images[0]
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sparsedit.errors import SparseditError
from sparsedit.families import family_of
from sparsedit.families.dit.face import DiffusersDiT
from sparsedit.families.face import DiffusersFace
from sparsedit.families.latte.face import DiffusersLatte
from sparsedit.families.pixart.face import DiffusersPixArt

__all__ = ["DiffusersDiT", "DiffusersFace", "DiffusersLatte", "DiffusersPixArt", "to_diffusers", "use_in_pipeline"]


def to_diffusers(model: nn.Module) -> DiffusersFace:
    """Wrap ``model`` for the diffusers pipeline of its family (weights are shared, nothing is copied)."""
    try:
        family = family_of(model)
    except SparseditError:
        raise SparseditError(f"no diffusers pipeline takes a {type(model).__name__}; pass a DiT, PixArt or Latte "
                             "model") from None
    return family.diffusers_face(model)  # type: ignore[return-value]


def use_in_pipeline(pipe: Any, model: nn.Module) -> Any:
    """Replace ``pipe.transformer`` with ``model`` (one call); returns the pipeline.

    The model must belong to the pipeline's family and agree with the replaced transformer's config
    (sample size, channels, caption width); it is moved to that transformer's device and dtype.
    """
    if not hasattr(pipe, "transformer"):
        raise SparseditError(f"{type(pipe).__name__} has no transformer to replace")
    wrapped = to_diffusers(model)
    pipeline_names = {cls.__name__ for cls in type(pipe).__mro__}
    if not pipeline_names & set(wrapped.pipelines):
        raise SparseditError(
            f"a {type(model).__name__} cannot replace the transformer of a {type(pipe).__name__}; it goes into "
            f"{' or '.join(wrapped.pipelines)} (load the model converted from this pipeline's transformer)"
        )
    old = pipe.transformer
    for key in wrapped.checked_keys:
        theirs, ours = getattr(old.config, key, None), getattr(wrapped.config, key)
        if theirs is not None and theirs != ours:
            raise SparseditError(f"the pipeline's transformer has {key}={theirs} but the sparsedit model has {ours}; "
                                 "use a model converted from this pipeline's transformer")
    # Set the attribute directly: the pipeline's config entry keeps naming the original class, so
    # save_pretrained of the pipeline is not supported with a swapped-in model (save ours separately).
    object.__setattr__(pipe, "transformer", wrapped.to(device=old.device, dtype=old.dtype))
    return pipe
