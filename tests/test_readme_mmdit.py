"""README, "SD3 and FLUX.1, start to finish": the commands and the pipeline snippet run as written on a tiny random
FluxPipeline saved offline as ``FLUX.1-dev``; only the sizes in :data:`SCALED` are scaled down."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import sparsedit  # noqa: E402
from sparsedit.cli import main  # noqa: E402
from tiny_pipelines import save_flux_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## SD3 and FLUX.1, start to finish"
# What a 4-block stand-in on 2 CPU cores can run: every other word of the commands is the README's.
SCALED = {"--layout 2,4,1,9,1,1,7": "--layout 0,1,1,1,1,0,1", "--data-free 2000": "--data-free 2",
          "--lora-rank 64": "--lora-rank 2", "--steps 2000": "--steps 2", "--batch-size 8": "--batch-size 2"}


def section() -> str:
    text = README.read_text()
    part = text[text.index(SECTION):]
    return part[: part.index("\n## ", len(SECTION))]


def commands(block: str) -> list[list[str]]:
    """The ``sparsedit ...`` lines of a shell block (continuations joined, comments dropped), sizes scaled."""
    lines = block.replace("\\\n", " ").splitlines()
    out = []
    for line in lines:
        line = line.split("  #")[0].strip()
        if not line:
            continue
        for old, new in SCALED.items():
            line = line.replace(old, new)
        argv = shlex.split(line)
        assert argv[0] == "sparsedit", line
        out.append(argv[1:])
    return out


def test_the_mmdit_recipe_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    part = section()
    shell = re.findall(r"```sh\n(.*?)```", part, flags=re.S)
    python = re.findall(r"```python\n(.*?)```", part, flags=re.S)
    assert len(shell) == 1 and len(python) == 1
    for old in SCALED:  # the scaling keeps up with the README
        assert shell[0].replace("\\\n    ", "").count(old) == 1, old
    save_flux_pipeline(tmp_path / "FLUX.1-dev")
    (tmp_path / "prompts.txt").write_text("a small cactus with a happy face\na red cat on the dog\n")
    monkeypatch.chdir(tmp_path)
    runs = commands(shell[0])
    assert [argv[0] for argv in runs] == ["flops", "encode-prompts", "train", "sample", "compare"]
    for argv in runs:
        assert main(argv) == 0, argv
    model = sparsedit.load_model("runs/flux/model")
    assert type(model).__name__ == "SparseFlux" and model.config.latent_hw == (64, 64)  # --image-size 512
    assert (tmp_path / "cactus.png").is_file() and (tmp_path / "cmp" / "compare.md").is_file()
    namespace: dict = {"__name__": "readme"}
    exec(compile(python[0], str(README), "exec"), namespace)
    assert type(namespace["pipe"].transformer.model).__name__ == "SparseFlux"
    assert namespace["image"].size == (256, 256)  # the stand-in VAE upsamples 2x: 128 x 128 latents
