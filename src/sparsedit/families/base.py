"""The model-family interface: everything that differs between DiT, PixArt-alpha and Latte, in one class.

Commands and library functions never ask "which family is this?"; they call
:func:`sparsedit.families.family_of` on a model or config and use the answer. A family is found by the
``model_type`` its configs write into ``config.json`` (a dense and a sparse one per family).

An instance is bound to one config (dense or sparse). What does not need a config (presets, recognising
and reading checkpoint files) is a classmethod. ``Tokens`` is a family's sparse token set: ``(h, w)`` for
image families, ``((h, w), frames)`` for video ones, None for the dense model.

To add a family, subclass :class:`Family` in ``sparsedit/families/NAME/family.py``, register it with
:func:`sparsedit.families.register` and list the module in ``sparsedit.families.BUILTIN`` (docs/architecture.md
has the checklist).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sparsedit.errors import SparseditError

Grid = tuple[int, int]
Tokens = Any


class Family:
    """One model family. Subclasses set the class attributes and override what their models do differently."""

    name: ClassVar[str]  # "dit": the folder under sparsedit/families
    dense_type: ClassVar[str]  # model_type of the dense model ("DiT")
    sparse_type: ClassVar[str]  # model_type of its sparse model ("SparseDiT")
    presets: ClassVar[tuple[str, ...]] = ()  # dense preset names ("DiT-XL/2", ...)
    preset_help: ClassVar[str] = ""  # how `--model` help lists this family's presets
    diffusers_format: ClassVar[str | None] = None  # detect_format's name for this family's diffusers directories
    default_rates: ClassVar[tuple[float, float]] = (0.61, 0.86)  # the paper's (r_min, r_max) for this family
    sample_suffixes: ClassVar[tuple[str, ...]] = (".png",)  # what `sparsedit sample --out` may write
    video_fps: ClassVar[int | None] = None  # a video family's frame rate for GIF / MP4 samples
    any_size: ClassVar[bool] = False  # the model runs at any resolution (its config's size is only a default)
    catch_all: ClassVar[bool] = False  # tried last when recognising a file or diffusers directory
    samplers: ClassVar[tuple[str, ...]] = ("ddpm", "ddim")  # timestep spacings of a sampling run (flops, bench)
    default_sampling: ClassVar[tuple[str, int]] = ("ddpm", 250)  # the run `sparsedit flops` measures by default
    default_cfg_scale: ClassVar[float] = 4.0  # `sparsedit sample`'s guidance scale unless --cfg-scale is given
    prompt_flag: ClassVar[str] = "--t5"  # where `sparsedit sample --prompt` finds the text encoder
    pooled_text: ClassVar[bool] = False  # the model takes a pooled text vector beside the caption (SD3, FLUX.1)
    min_snr: ClassVar[bool] = True  # its training process takes Min-SNR weighting (the default recipe uses it)

    def __init__(self, config: Any):
        self.config = config
        self.sparse = config.model_type == self.sparse_type

    # ---- classes, configs, presets ------------------------------------------------------------

    @classmethod
    def model_types(cls) -> dict[str, tuple[type, type[nn.Module]]]:
        """``{model_type: (config class, model class)}`` for the dense and the sparse model."""
        raise NotImplementedError

    @classmethod
    def resolve_preset(cls, name: str, image_size: int) -> tuple[Any, str | None] | None:
        """(dense config, layout of a sparse preset or None) for a preset name of this family, else None."""
        return None

    def dense_config(self) -> Any:
        """The dense config a sparse config extends (same fields, no layout); a dense config as is."""
        if not self.sparse:
            return self.config
        dense_cls = self.model_types()[self.dense_type][0]
        fields = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(dense_cls) if f.init}
        return dense_cls(**fields)

    def check_rates(self, rates: dict[str, Any]) -> None:
        """Refuse schedule options this family has no use for (given as non-None values in ``rates``)."""

    def sparse_config(self, layout: str, **rates: Any) -> Any:
        """The sparse config of this dense config with ``layout`` and schedule options."""
        raise NotImplementedError

    def block_kinds(self) -> list[str]:
        """The kind of every block, in order (``pool``, ``gen``, ``sparse``, ``recover``, ``dense``, ``top``, ...)."""
        if not self.sparse:
            return ["top"] * self.config.depth
        from sparsedit.core.layout import block_kinds

        return block_kinds(self.config.layout, self.config.extra_recovery)

    # ---- sparsify --------------------------------------------------------------------------------

    def sparsify(self, model: nn.Module, layout: str | None, num_pieces: int | None, **options: Any) -> nn.Module:
        """The sparse model of the dense ``model`` (``options``: r_min, r_max, upsample, recovery_pos_embed,
        extra_recovery; absent ones take the family's defaults)."""
        raise NotImplementedError

    def init_rules(self, model: nn.Module) -> list[Any]:
        """How every tensor of the sparse ``model`` is initialised from its dense source (``sparsify --verbose``)."""
        from sparsedit.families.dit.sparsify import init_rules

        return init_rules(model.config, list(model.state_dict()))

    def refuse_sparse_source(self) -> None:
        if self.sparse:
            raise SparseditError(f"the source is already a {self.sparse_type}; pass the dense model it came from")

    def token_sets(self) -> list[Tokens]:
        """The distinct sparse token sets a full sampling run of a sparse model can use, fewest tokens first."""
        grids = {p.grid for p in self.config.schedule.pieces(self.config.grid)}
        return sorted(grids, key=lambda g: g[0] * g[1])

    @staticmethod
    def tokens_label(tokens: Tokens) -> str:
        """How logs and messages name a token set: ``5x5`` (a grid), ``4x4x2f`` (((h, w), frames) of a video)."""
        if isinstance(tokens[0], tuple):
            (h, w), f = tokens
            return f"{h}x{w}x{f}f"
        return f"{tokens[0]}x{tokens[1]}"

    # ---- checkpoint formats ------------------------------------------------------------------------

    @classmethod
    def reads_diffusers(cls, cfg: dict[str, Any]) -> bool:
        """Whether a diffusers ``config.json`` (with ``_class_name``) is one of this family's transformers."""
        return False

    @classmethod
    def from_diffusers(cls, path: Path) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def reads_file(cls, obj: Any) -> bool:
        """Whether the contents of a single checkpoint file (a state dict or training dict) are this family's."""
        return False

    @classmethod
    def from_file(cls, obj: Any, path: Path, preset: str | None, image_size: int | None, use_ema: bool) -> nn.Module:
        raise NotImplementedError

    def save_diffusers(self, model: nn.Module, out: str | Path, overwrite: bool, drop_null_caption: bool) -> Path:
        raise SparseditError(f"a {type(model).__name__} has no diffusers format; use --to sparsedit")

    def export_differences(self) -> list[str]:
        """Numerical settings a diffusers export cannot keep (empty when it is exact)."""
        if getattr(self.config, "text_mask_bias", -10000.0) is None:
            return ["caption padding: excluded exactly -> a -10000 logit bias (diffusers; equal unless logits reach ~1e4)"]
        return []

    # ---- conditioning and sampling ----------------------------------------------------------------

    @property
    def text_conditioned(self) -> bool:
        """True when the model takes T5 caption embeddings; False for class labels (or none)."""
        return False

    @property
    def frames(self) -> int | None:
        """Frames of a video model's samples (None for an image model)."""
        return None

    def generate(self, model: nn.Module, labels: Sequence[int] | None = None, text: dict[str, Tensor | None] | None = None,
                 **common: Any) -> Tensor:
        """Samples of ``model``: by class ``labels``, or by caption embeddings ``text`` (``embeds``, ``mask``,
        ``null_embeds``, ``null_mask``); ``common``: sampler, steps, eta, cfg_scale, cfg_mode, seed, device, progress."""
        raise NotImplementedError

    def teacher_sampling(self) -> dict[str, Any]:
        """How data-free distillation draws the teacher's samples (``generate`` keywords and the ``batch_size`` of one
        call): DDIM 50, no guidance, 250 at a time."""
        return {"sampler": "ddim", "steps": 50, "cfg_scale": 1.0, "batch_size": 250}

    def latent_scaling(self, vae: nn.Module) -> tuple[float, float]:
        """(scale, shift) of the model's latents: ``model latent = (VAE latent - shift) * scale``. The SD VAE's
        0.18215 for DiT-style models, whatever the VAE's config says (they were trained with it)."""
        from sparsedit.encoders.vae import LATENT_SCALE

        return LATENT_SCALE, 0.0

    def config_at_size(self, image_size: int) -> Any:
        """This config at ``image_size`` pixels: a square of ``image_size / 8`` latents (or pixels in pixel space);
        families whose sizes are not squares (Wan: 480 -> 480 x 832) override it. What `sparsedit flops` counts."""
        from sparsedit.encoders.vae import VAE_DOWNSAMPLE

        factor = VAE_DOWNSAMPLE if self.config.data_space == "latent" else 1
        if image_size % factor:
            raise SparseditError(f"image size {image_size} is not divisible by the VAE factor {factor}; pick e.g. 256")
        return dataclasses.replace(self.config, input_size=image_size // factor)

    def set_image_size(self, model: nn.Module, image_size: int) -> None:
        """Make ``image_size`` the default resolution of a loaded model that runs at any size (SD3, FLUX.1, Wan); a
        model whose checkpoint fixes its size is left alone (``load_cli_model`` refuses a different --image-size)."""

    def load_vae(self, path: str | Path | None, device: torch.device | str) -> nn.Module:
        """The VAE that decodes this model's samples, from a local directory (an SD-style ``AutoencoderKL``)."""
        from sparsedit.encoders.vae import load_vae

        return load_vae(path, device, latent_channels=self.config.in_channels)

    def decode_samples(self, model: nn.Module, samples: Tensor, vae: nn.Module | None) -> Tensor:
        """Model-space samples -> images (B, C, H, W) or videos (B, C, F, H, W) in [-1, 1]; video latents are decoded
        frame by frame (an image VAE), with the family's :meth:`latent_scaling`."""
        from sparsedit.diffusion.sampling import to_images

        scaling = None if vae is None else self.latent_scaling(vae)
        if samples.ndim == 5:
            b, c, f, h, w = samples.shape
            frames = to_images(model, samples.transpose(1, 2).reshape(b * f, c, h, w), vae, scaling)
            return frames.reshape(b, f, *frames.shape[1:]).transpose(1, 2)
        return to_images(model, samples, vae, scaling)

    def default_vae_dir(self, encoder_path: str | Path | None) -> Path | None:
        """Where the VAE is when ``--vae`` is not given (flow families: in the pipeline folder); None: ask for it."""
        return None

    def encode_prompts(self, model: nn.Module | None, encoder_path: str | Path, prompts: Sequence[str],
                       negative: str | None, guided: bool, device: torch.device | str) -> dict[str, Tensor]:
        """Prompts -> the ``text`` dict of :meth:`generate`, with the local T5 at ``encoder_path``; the negative prompt
        (default empty) only under guidance and only for a model that stores no null caption (PixArt's learned
        ``y_embedding``)."""
        from sparsedit.encoders.text import T5Encoder

        t5 = T5Encoder(encoder_path, device)
        if t5.channels != self.config.caption_channels:
            raise SparseditError(f"the T5 at {encoder_path} gives {t5.channels}-wide embeddings but the model takes "
                                 f"{self.config.caption_channels}; use the T5 the model was trained with")
        stored = getattr(getattr(model, "y_embedder", None), "y_embedding", None)
        text = t5.text(prompts, negative, with_negative=guided and stored is None)
        for key in ("null_embeds", "null_mask"):  # one row for every prompt
            if key in text:
                text[key] = text[key].expand(len(prompts), *text[key].shape[1:])
        return text

    def added_conditions(self, latent_hw: Sequence[int], batch: int, device: torch.device | str) -> dict[str, Tensor] | None:
        """Extra inputs of a training forward besides the caption (PixArt-1024's image size and aspect ratio)."""
        return None

    def write_samples(self, images: Tensor, out: Path, nrow: int | None, fps: int | None) -> Path:
        """Write decoded samples in [-1, 1] to ``out``: images as a PNG grid; videos (B, C, F, H, W) by the suffix
        (``.mp4``, ``.gif``, else a PNG frame strip) at ``fps`` (default ``video_fps``)."""
        if images.ndim == 5:
            from sparsedit.core.video import write_video

            return write_video(images, out, fps or self.video_fps or 8, nrow)
        from sparsedit.core.images import save_grid

        return save_grid(images, out, nrow=nrow)

    def training_process(self) -> Any:
        """The process the trainer noises data with and takes the loss of: the DDPM of DiT-style models (flow-matching
        families return :class:`sparsedit.diffusion.flow.FlowProcess`)."""
        from sparsedit.diffusion.process import create_diffusion

        return create_diffusion(None, learn_sigma=self.config.learn_sigma)

    def training_kwargs(self, cond: dict[str, Any], caption: Tensor, device: torch.device) -> dict[str, Any]:
        """The caption keyword arguments of a training forward, from a data item's ``cond`` dict and its (possibly
        dropped) caption: T5 embeddings and their mask here; families with more inputs add them."""
        mask = cond.get("encoder_attention_mask")
        return {"encoder_hidden_states": caption, "encoder_attention_mask": None if mask is None else mask.to(device)}

    def timestep_sampler(self, generator: torch.Generator) -> Any:
        """The training timestep sampler of a sparse model (None: uniform timesteps, a dense model)."""
        if not self.sparse:
            return None
        from sparsedit.core.schedule import PieceSampler

        return PieceSampler(self.config.schedule, self.config.grid, generator)

    def draws_training_grids(self) -> bool:
        """Whether the trainer can draw sample grids of this model (``--sample-every``): class-conditional images."""
        return False

    def diffusers_face(self, model: nn.Module) -> nn.Module:
        """``model`` behind the call signature of its diffusers transformer (for ``use_in_pipeline``)."""
        raise SparseditError(f"no diffusers pipeline takes a {type(model).__name__}; pass a DiT, PixArt or Latte model")

    def attention_layers(self, model: nn.Module) -> list[nn.Module]:
        """The self-attention of every block (``sparsedit analyze``); families without one per block refuse."""
        raise not_analyzable(model)

    # ---- one model evaluation, as bench and flops run it --------------------------------------------

    def check_guidance(self, name: str) -> None:
        """Refuse guidance for a model trained without an unconditional input (a null class)."""
        if self.config.class_dropout_prob <= 0:
            raise SparseditError(f"{name} was trained without a null class, so --cfg-scale must be 1")

    def sample_shape(self, rows: int) -> tuple[int, ...]:
        return (rows, self.config.in_channels, *self.config.latent_hw)

    def conditioning(self, model: nn.Module, batch: int, guided: bool, gen: torch.Generator) -> dict[str, Tensor]:
        """Random non-noise inputs of one evaluation with ``batch`` rows (twice that under guidance, the second
        half unconditional), as a dict of CPU tensors."""
        raise NotImplementedError

    def call(self, fn: Callable[..., Tensor], x: Tensor, t: Tensor, cond: dict[str, Tensor], tokens: Tokens) -> Tensor:
        """Run ``fn`` (the model or its compiled forward) on ``x``, ``t`` and ``cond`` with explicit sparse tokens."""
        raise NotImplementedError

    def sampling_timesteps(self, sampler: str, steps: int) -> list[float]:
        """The model timesteps of a ``steps``-step run, in increasing order (``flops`` reports per step in this order).

        DDPM models: ``ddpm`` = evenly spaced including both ends (DiT's "250"), ``ddim`` = ``range(0, T, T / steps)``.
        Flow families override this with their Euler sigmas times 1000.
        """
        from sparsedit.diffusion.process import space_timesteps

        if sampler not in self.samplers:
            raise SparseditError(f"a {self.dense_type} samples with {' or '.join(self.samplers)}, not {sampler}")
        num_timesteps = self.config.num_timesteps if self.sparse else 1000
        spec = f"ddim{steps}" if sampler == "ddim" else str(steps)
        return [float(t) for t in sorted(space_timesteps(num_timesteps, spec))]

    def tokens_at(self, t: float) -> Tokens:
        """The token set the schedule uses at model timestep ``t`` (None for a dense model): fractional and
        flow-matching timesteps (``sigma * 1000``) map to the integer step as the model maps them."""
        if not self.sparse:
            return None
        from sparsedit.core.schedule import discrete_timestep

        schedule = self.config.schedule
        return schedule.grid(discrete_timestep(float(t), schedule.num_timesteps), self.config.grid)

    def describe(self, tokens: Tokens) -> dict[str, Any]:
        """JSON fields naming ``tokens`` (the dense grid for a dense model)."""
        return {"forward_grid": list(self.config.grid if tokens is None else tokens)}

    def reset_buffers(self, model: nn.Module) -> None:
        """Recompute the non-learned buffers (position tables) after ``to_empty``: they are not random."""
        model.pos_embed.copy_(model.position_table(self.config.grid)[None])

    # ---- cost counting: how sparsedit.eval.macs runs the model and reads its counts -----------------

    # The modules that form a MAC report's ``final`` segment; the blocks (``model.blocks``) form the block segments
    # and everything else (embedders, position tables, layout changes) the ``embed`` segment.
    cost_final_modules: ClassVar[tuple[str, ...]] = ("final_layer",)
    # Conditioning inputs that are token sequences (caption embeddings): element-wise work computed from them counts
    # as ``other``, like work on the latent's tokens; work on labels, timesteps and masks never does.
    cost_token_inputs: ClassVar[tuple[str, ...]] = ()
    # Config fields that only choose the token set of a timestep (the pruning schedule): a count with explicit
    # tokens does not depend on them, so configs differing only there share one count.
    cost_schedule_fields: ClassVar[tuple[str, ...]] = ("r_min", "r_max", "num_pieces", "num_timesteps")

    def cost_conditioning(self, model: nn.Module, text_len: int | None) -> dict[str, Tensor]:
        """The conditioning of the one unguided sample a MAC count runs (CPU tensors); ``text_len``: caption
        tokens (None: the family's default), ignored by families without captions."""
        return self.conditioning(model, 1, False, torch.Generator())

    def cost_size_fields(self, frames: int | None) -> dict[str, Any]:
        """Config fields, besides ``input_size``, that make the model run on ``frames`` frames (video families)."""
        return {}

    def split_tokens(self, tokens: Tokens) -> tuple[Grid | None, int | None]:
        """A token set as (sparse grid, sparse frames); frames None for an image family, both None for dense."""
        return tokens, None

    def block_part(self, kind: str) -> str:
        """Where a block kind's MACs go: its segment ``pool`` / ``top``, or its SDTM part ``gen``, ``sparse``,
        ``recover`` or ``dense`` (the kind without its ``+`` / ``*`` / ``_axis`` suffix: ``recover*`` -> ``recover``)."""
        return kind.split("_")[0].rstrip("+*")


def not_analyzable(model: object) -> SparseditError:
    return SparseditError(
        f"analyze needs a dense DiT, got {type(model).__name__}; pass the original DiT checkpoint (a SparseDiT "
        "has no self-attention in its poolingformers and mixes token grids)"
    )


def refuse_drop_null_caption(model: nn.Module, drop_null_caption: bool) -> None:
    if drop_null_caption:
        raise SparseditError(f"drop_null_caption (--drop-null-caption) is for PixArt; a {type(model).__name__} has no "
                             "null caption: drop it")


def label_conditioning(num_classes: int, batch: int, guided: bool, gen: torch.Generator) -> dict[str, Tensor]:
    """Random class labels for :meth:`Family.conditioning`; under guidance the second half is the null class."""
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    if guided:
        y = torch.cat([y, torch.full_like(y, num_classes)])
    return {"y": y}


def caption_conditioning(model: nn.Module, config: Any, batch: int, guided: bool, gen: torch.Generator,
                         length: int) -> dict[str, Tensor]:
    """Random T5-sized caption embeddings of ``length`` tokens, all attended (a mask of ones), for the caption
    families' :meth:`Family.conditioning`.

    Under guidance the unconditional half gets the model's stored null caption (zeros when the checkpoint has
    none).
    """
    rows = 2 * batch if guided else batch
    text = torch.randn(batch, length, config.caption_channels, generator=gen)
    mask = torch.ones(rows, length)
    if guided:
        null = torch.zeros_like(text)
        stored = getattr(model.y_embedder, "y_embedding", None)
        if stored is not None:  # fit a stored null caption of another length into the static caption length
            k = min(length, stored.shape[0])
            null[:, :k] = stored[:k].detach().float().cpu()
            mask[batch:, k:] = 0
        text = torch.cat([text, null])
    return {"encoder_hidden_states": text, "encoder_attention_mask": mask}
