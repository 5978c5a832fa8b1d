"""``sparsedit encode-prompts``: prompts -> a prompt-embeddings file, with the model's own local text encoders.

SD3 / FLUX.1 prompts are encoded by their diffusers pipeline folder (``--pipeline``: its CLIP and T5 encoders, by the
pipeline's own ``encode_prompt``), PixArt / Latte prompts by a local T5 (``--t5``). The file
(:mod:`sparsedit.core.prompts`) is what ``sparsedit sample --prompt-embeds`` and ``sparsedit train --data-free N
--prompt-embeds`` read, so the text encoders (about 10 GB for SD3 and FLUX.1) are loaded once, not by every run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sparsedit.cli.common import add_device_arg, check_device
from sparsedit.core.checkpoint import check_output_file
from sparsedit.errors import SparseditError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode-prompts", help="encode prompts once with a model's local text encoders",
                       description="Encode prompts with the local text encoders of a model and write a "
                       "prompt-embeddings file (.safetensors) for `sparsedit sample --prompt-embeds` and `sparsedit train "
                       "--data-free N --prompt-embeds`. SD3 / FLUX.1: --pipeline DIR (the diffusers pipeline folder); "
                       "PixArt / Latte: --t5 DIR.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pipeline", metavar="DIR", help="an SD3 / SD3.5 / FLUX.1 diffusers pipeline folder")
    src.add_argument("--t5", metavar="DIR", help="a PixArt pipeline folder or a T5EncoderModel folder with its tokenizer")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", nargs="+", metavar="TEXT", help="the prompts")
    text.add_argument("--prompts-file", metavar="FILE", help="a UTF-8 text file with one prompt per line")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="the unconditional caption for guidance (default: the empty prompt); not for FLUX.1")
    p.add_argument("--no-negative", action="store_true",
                   help="write no negative embeddings (unguided sampling only; FLUX.1 never has them)")
    p.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_device_arg(p)
    p.set_defaults(func=run)


def read_prompts(path: str) -> list[str]:
    """The non-empty lines of a prompts file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SparseditError(f"--prompts-file {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise SparseditError(f"--prompts-file {path} is a directory; give a text file with one prompt per line") from None
    except UnicodeDecodeError:
        raise SparseditError(f"--prompts-file {path} is not UTF-8 text; save it as UTF-8, one prompt per line") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SparseditError(f"--prompts-file {path} holds no prompts; write one prompt per line")
    return prompts


def run(args: argparse.Namespace) -> int:
    from sparsedit.core.prompts import write_prompt_embeds

    out = check_output_file(args.out, "--out", (".safetensors",), args.overwrite)
    device = check_device(args.device)
    if args.no_negative and args.negative_prompt is not None:
        raise SparseditError("--negative-prompt and --no-negative contradict each other; drop one")
    prompts = args.prompt if args.prompt is not None else read_prompts(args.prompts_file)
    start = time.perf_counter()
    if args.pipeline is not None:
        from sparsedit.families.flow import pipeline_family

        family = pipeline_family(args.pipeline)
        guided = family.default_cfg_scale != 1.0 and not args.no_negative  # FLUX.1 is never guided
        if args.negative_prompt is not None and family.default_cfg_scale == 1.0:
            raise SparseditError(f"a {family.dense_type} takes no negative prompt (no classifier-free guidance); drop "
                                 "--negative-prompt")
        text = family.encode_prompts(None, args.pipeline, prompts, args.negative_prompt, guided, device)
    else:
        from sparsedit.encoders.text import T5Encoder

        # PixArt checkpoints with a learned null caption ignore the negative embeddings
        text = T5Encoder(args.t5, device).text(prompts, args.negative_prompt, with_negative=not args.no_negative)
    write_prompt_embeds(out, text, prompts)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in text.items())
    print(f"wrote {out}: {len(prompts)} prompts ({shapes}; {time.perf_counter() - start:.1f}s)")
    return 0
