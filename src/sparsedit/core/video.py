"""Writing sampled videos: a frame strip (PNG), an animated GIF (Pillow) or an MP4 (H.264 through PyAV, optional).

Several videos play side by side in a GIF or MP4: each output frame is the grid (``nrow`` per row) of the videos'
frame at that time. Every file is written beside its target and renamed into place, so a reader never sees half a
video.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from sparsedit.core.checkpoint import atomic_write
from sparsedit.core.images import make_grid, save_grid
from sparsedit.errors import SparseditError

VIDEO_SUFFIXES = (".png", ".gif", ".mp4")
MP4_HELP = "writing .mp4 needs PyAV: pip install av (or `pip install sparsedit[video]`); or write a .gif"


def save_video_strip(videos: Tensor, path: str | Path) -> Path:
    """Write (B, C, F, H, W) videos in [-1, 1] (C = 1 or 3) as one PNG: one row per video, frames left to right."""
    b, c, f, hh, ww = videos.shape
    frames = videos.transpose(1, 2).reshape(b * f, c, hh, ww)  # (B*F, C, H, W), video-major
    return save_grid(frames, path, nrow=f)


def _frame_grids(videos: Tensor, nrow: int | None) -> list[np.ndarray]:
    """(C, F, H, W) or (B, C, F, H, W) in [-1, 1] -> F uint8 (H', W', C) grids, one per time step."""
    if videos.ndim == 4:
        videos = videos[None]
    padding = 0 if videos.shape[0] == 1 else 2
    return [make_grid(videos[:, :, f], nrow, padding) for f in range(videos.shape[2])]


def save_video_gif(videos: Tensor, path: str | Path, fps: int = 8, nrow: int | None = None) -> Path:
    """Write a (C, F, H, W) video or (B, C, F, H, W) videos in [-1, 1] as one looping animated GIF."""
    from PIL import Image

    frames = [Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g) for g in _frame_grids(videos, nrow)]
    path = Path(path)
    atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=max(1, round(1000 / fps)), loop=0))
    return path


def save_video_mp4(videos: Tensor, path: str | Path, fps: int = 16, nrow: int | None = None, crf: int = 18) -> Path:
    """Write a (C, F, H, W) video or (B, C, F, H, W) videos in [-1, 1] as one H.264 MP4 (yuv420p, quality ``crf``).

    H.264 in yuv420p needs even sides, so an odd grid gets one black row / column. Needs PyAV (``pip install av``).
    """
    try:
        import av
    except ImportError:
        raise SparseditError(MP4_HELP) from None
    grids = _frame_grids(videos, nrow)
    h, w = grids[0].shape[:2]
    even_h, even_w = h + h % 2, w + w % 2

    def write(tmp: Path) -> None:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = even_w, even_h, "yuv420p"
            stream.options = {"crf": str(crf)}
            for grid in grids:
                rgb = np.zeros((even_h, even_w, 3), dtype=np.uint8)
                rgb[:h, :w] = grid if grid.shape[-1] == 3 else grid[..., :1]  # grey -> every channel
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():  # flush the encoder
                container.mux(packet)

    path = Path(path)
    atomic_write(path, write)
    return path


def write_video(videos: Tensor, out: str | Path, fps: int, nrow: int | None = None) -> Path:
    """Write sampled videos by ``out``'s suffix: ``.mp4`` (PyAV), ``.gif``, else a PNG frame strip."""
    suffix = Path(out).suffix.lower()
    if suffix == ".mp4":
        return save_video_mp4(videos, out, fps, nrow)
    if suffix == ".gif":
        return save_video_gif(videos, out, fps, nrow)
    return save_video_strip(videos, out)
