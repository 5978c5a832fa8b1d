"""Writing sampled videos (sparsedit.core.video): MP4 through PyAV decodes back to the frames written (within H.264's
loss), GIF and MP4 play the videos side by side, odd sizes are padded for yuv420p, and a missing PyAV is refused in
one line before any sampling."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import one_line
from sparsedit.core.images import make_grid
from sparsedit.core.video import MP4_HELP, save_video_gif, save_video_mp4, write_video
from sparsedit.errors import SparseditError

av = pytest.importorskip("av")


def smooth_videos(b: int = 2, f: int = 6, h: int = 32, w: int = 48) -> torch.Tensor:
    """Slowly varying colour ramps (H.264 keeps them to a few levels), moving over time."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    out = torch.empty(b, 3, f, h, w)
    for i in range(b):
        for t in range(f):
            out[i, 0, t] = (x + 0.2 * t) * 0.5
            out[i, 1, t] = (y - 0.1 * t + 0.3 * i) * 0.5
            out[i, 2, t] = 0.4 * torch.sin(2 * x + t) * torch.cos(y)
    return out.clamp(-1, 1)


def decode(path: Path) -> tuple[list[np.ndarray], float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate)
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)], rate


def test_mp4_holds_the_grid_of_every_frame(tmp_path: Path) -> None:
    videos = smooth_videos()
    path = save_video_mp4(videos, tmp_path / "v.mp4", fps=12)
    frames, rate = decode(path)
    assert len(frames) == videos.shape[2] and rate == pytest.approx(12)
    grids = [make_grid(videos[:, :, t], None, 2).astype(int) for t in range(videos.shape[2])]  # as the GIF's
    for t, frame in enumerate(frames):
        assert frame.shape == grids[t].shape
        err = np.abs(frame.astype(int) - grids[t]).mean()  # H.264 at crf 18: a few levels, most at the black seams
        assert err < 6 and err < 0.5 * np.abs(frame.astype(int) - grids[(t + 1) % len(grids)]).mean()
    gif = Image.open(save_video_gif(videos, tmp_path / "v.gif", fps=12))
    assert gif.n_frames == videos.shape[2] and gif.size == frames[0].shape[1::-1]


def test_odd_sizes_and_grey_videos_are_padded_to_even_sides(tmp_path: Path) -> None:
    grey = smooth_videos(b=1, f=3, h=15, w=21)[:, :1]
    frames, _ = decode(write_video(grey, tmp_path / "g.mp4", fps=8))
    assert frames[0].shape == (16, 22, 3)  # one black row and column for yuv420p
    assert frames[0][-1].max() < 20 and frames[0][:, -1].max() < 20
    want = make_grid(grey[:, :, 0], None, 0)[..., 0]
    assert np.abs(frames[0][:15, :21, 0].astype(int) - want.astype(int)).mean() < 3


def test_write_video_picks_the_format_by_suffix(tmp_path: Path) -> None:
    videos = smooth_videos(b=1, f=2)
    assert Image.open(write_video(videos, tmp_path / "a.gif", fps=4)).n_frames == 2
    assert Image.open(write_video(videos, tmp_path / "a.png", fps=4)).size == (2 * (48 + 2) + 2, 32 + 4)


def test_a_missing_pyav_is_one_line_naming_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_av(name: str, *args: object, **kwargs: object) -> object:
        if name == "av":
            raise ImportError("no av")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(SparseditError) as err:
        save_video_mp4(smooth_videos(b=1, f=2), tmp_path / "x.mp4")
    assert one_line(err, "pip install av", ".gif") == MP4_HELP
    assert not (tmp_path / "x.mp4").exists()
