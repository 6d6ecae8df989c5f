"""Video files in, frames out: decoding with transformers' own loader and a torchvision-free video processor.

    clip = vtc.video.load_video("assets/shapes.mp4", num_frames=8)    # or fps=2.0; all frames when neither
    clip.frames          # (8, H, W, 3) uint8, RGB
    clip.timestamps      # seconds of each sampled frame (Qwen2.5-VL / Qwen3-VL put them in the prompt)
    clip.backend         # "decord" when `decord` is installed, else "pyav"

Decoding is `transformers.video_utils.load_video` (DESIGN.md section 8): vtc reads no video by hand. Install a
backend with `pip install 'vtc-vlm[video]'` (decord and PyAV).

`ensure_video_processor(processor)` gives a HF processor that has no video processor (transformers' video
processors need torchvision, which must not be installed beside the CPU torch here: DESIGN.md section 7) one
built from its image processor, so `processor(text=..., videos=...)` and its chat template's `{"type": "video"}`
work as with the real one: Qwen2-VL / 2.5-VL / 3-VL frames are patchified in temporal pairs (what their video
processors do), LLaVA-OneVision and InternVL frames are resized to the vision input and stacked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.utils import PushToHubMixin

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".gif")
BACKENDS = ("decord", "pyav")


@dataclass
class Video:
    """Sampled frames of one clip: `frames` (T, H, W, 3) uint8 RGB, the source's frame rate and frame count, the
    index of each sampled frame, the decoder used (`"frames"` when the frames were given, not decoded)."""

    frames: np.ndarray
    fps: float | None = None
    total_frames: int | None = None
    indices: list[int] = field(default_factory=list)
    backend: str = "frames"
    path: str | None = None

    @property
    def timestamps(self) -> list[float] | None:
        """Seconds of each sampled frame from the start of the clip (None when the frame rate is unknown)."""
        if not self.fps:
            return None
        return [i / self.fps for i in self.indices]

    @property
    def metadata(self):
        """The clip as transformers' `VideoMetadata` (what its video processors and Qwen3-VL's prompt read)."""
        from transformers.video_utils import VideoMetadata

        t, h, w = self.frames.shape[:3]
        return VideoMetadata(
            total_num_frames=self.total_frames or t,
            fps=self.fps,
            duration=(self.total_frames or t) / self.fps if self.fps else None,
            video_backend=self.backend,
            frames_indices=list(self.indices) or list(range(t)),
            height=h,
            width=w,
        )

    def images(self) -> list[Image.Image]:
        return [Image.fromarray(f) for f in self.frames]

    def __len__(self) -> int:
        return len(self.frames)


def available_backend() -> str | None:
    """The decoder `load_video` uses: decord where installed, else PyAV, else None."""
    from transformers.utils import is_av_available, is_decord_available

    return "decord" if is_decord_available() else "pyav" if is_av_available() else None


def load_video(
    path: str | Path,
    num_frames: int | None = None,
    fps: float | None = None,
    backend: str | None = None,
    max_frames: int | None = None,
) -> Video:
    """Decode `path` with `transformers.video_utils.load_video`: `num_frames` frames spread evenly over the clip,
    or `fps` frames per second of video, or every frame when neither is given; `max_frames` caps the count (a
    shorter clip gives all its frames, where `num_frames` above the clip's length is an error). Returns a `Video`.

    `backend`: "decord" or "pyav" (default: decord where installed, else PyAV). A missing or unreadable file, a
    file without a video stream and a request for no frames raise errors that name the path."""
    from transformers.video_utils import default_sample_indices_fn
    from transformers.video_utils import load_video as hf_load_video

    path = str(path)
    if num_frames is not None and fps is not None:
        raise ValueError(f"{path}: give num_frames or fps, not both")
    if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
        raise ValueError(f"{path}: num_frames must be an int >= 1 (got {num_frames!r}); None decodes every frame")
    if fps is not None and not fps > 0:
        raise ValueError(f"{path}: fps must be > 0 (got {fps!r}); None decodes every frame")
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"{path}: max_frames must be an int >= 1 (got {max_frames!r})")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no video file at {path}")
    backend = backend or available_backend()
    if backend is None:
        raise ImportError(f"decoding {path} needs decord or PyAV: pip install 'vtc-vlm[video]' (or av, or decord)")
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; known: {', '.join(BACKENDS)}")
    _check_video_stream(path)
    def sample(metadata, **_):
        indices = default_sample_indices_fn(metadata, num_frames=num_frames, fps=fps)
        if max_frames is not None and len(indices) > max_frames:
            indices = default_sample_indices_fn(metadata, num_frames=max_frames)
        return indices

    try:
        frames, meta = hf_load_video(path, backend=backend, sample_indices_fn=sample)
    except Exception as error:
        raise ValueError(f"cannot decode the video {path} with {backend}: {error}") from error
    frames = np.asarray(frames)
    if frames.ndim != 4 or not len(frames):
        raise ValueError(f"no frames decoded from {path} with {backend} (got an array of shape {frames.shape})")
    return Video(
        frames=frames,
        fps=float(meta.fps) if meta.fps else None,
        total_frames=int(meta.total_num_frames),
        indices=[int(i) for i in meta.frames_indices],
        backend=backend,
        path=path,
    )


def _check_video_stream(path: str) -> None:
    """Open the container with PyAV (when installed) to tell a corrupt file and an audio-only file apart."""
    from transformers.utils import is_av_available

    if not is_av_available():
        return
    import av

    try:
        with av.open(path) as container:
            streams = list(container.streams.video)
    except Exception as error:
        raise ValueError(f"cannot open the video {path}: {error} (a corrupt or non-video file?)") from error
    if not streams:
        raise ValueError(f"{path} has no video stream (only {_stream_kinds(path)})")


def _stream_kinds(path: str) -> str:
    import av

    with av.open(path) as container:
        kinds = sorted({s.type for s in container.streams})
    return ", ".join(kinds) or "no streams"


def as_video(item, num_frames: int | None = None, fps: float | None = None) -> Video:
    """A `Video` from a path (decoded), a `Video`, a list of PIL frames or an array/tensor (T, H, W, 3) uint8.
    Frames that are given are kept as they are (num_frames/fps apply to files only)."""
    if isinstance(item, Video):
        return item
    if isinstance(item, (str, Path)):
        return load_video(item, num_frames=num_frames, fps=fps)
    if isinstance(item, (list, tuple)) and item and all(isinstance(f, Image.Image) for f in item):
        frames = np.stack([np.asarray(f.convert("RGB")) for f in item])
    elif isinstance(item, (np.ndarray, torch.Tensor)):
        frames = np.asarray(item)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"video frames must be (T, H, W, 3) RGB, got shape {frames.shape}")
        if frames.dtype != np.uint8:
            raise ValueError(f"video frames must be uint8 in 0..255, got {frames.dtype}")
    else:
        raise TypeError(f"a video is a file path, a list of PIL frames or a (T, H, W, 3) array, got {item!r:.80}")
    if not len(frames):
        raise ValueError("a video needs at least one frame, got none")
    return Video(frames=frames, indices=list(range(len(frames))))


def is_video_path(item) -> bool:
    return isinstance(item, (str, Path)) and Path(item).suffix.lower() in VIDEO_SUFFIXES


# --- a video processor without torchvision -------------------------------------------------------------------------
class FramesVideoProcessor(PushToHubMixin):
    """A stand-in for a family's HF video processor, built from the processor's (PIL) image processor; it returns
    what the real one returns, so the processor's own `__call__` expands the video placeholders.

    - `layout="patches"` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): each frame is resized and patchified by the image
      processor; pairs of frames (`temporal_patch_size`) form one temporal patch, the last frame repeated when
      the count is odd. Returns `pixel_values_videos` (patches, 3 * t * p * p) and `video_grid_thw`.
    - `layout="frames"` (LLaVA-OneVision, InternVL): each frame resized to the vision input size, rescaled and
      normalised with the image processor's mean/std. Returns `pixel_values_videos` (videos, T, 3, H, W).

    Both return `video_metadata` when asked (`return_metadata=True`, as Qwen2.5-VL and Qwen3-VL processors do)."""

    def __init__(self, image_processor, layout: str) -> None:
        if layout not in ("patches", "frames"):
            raise ValueError(f"unknown layout {layout!r}; known: patches, frames")
        self.image_processor, self.layout = image_processor, layout
        for name in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std", "size"):
            if hasattr(image_processor, name):
                setattr(self, name, getattr(image_processor, name))

    def to_dict(self) -> dict:
        """What the processor's `repr` / `to_json_string` show for it (it has no files to save)."""
        return {"video_processor_type": type(self).__name__, "layout": self.layout}

    def __call__(self, videos, video_metadata=None, return_metadata: bool = False, return_tensors=None, **_) -> dict:
        clips = [as_video(v) for v in (videos if isinstance(videos, list) else [videos])]
        metadata = video_metadata if video_metadata is not None else [c.metadata for c in clips]
        if not isinstance(metadata, (list, tuple)):
            metadata = [metadata]
        metadata = [m if m is not None else c.metadata for m, c in zip(metadata, clips)]
        out = self._patches(clips) if self.layout == "patches" else self._frames(clips)
        if return_metadata:
            out["video_metadata"] = metadata
        return out

    def _patches(self, clips: list[Video]) -> dict:
        t = self.temporal_patch_size
        pixels, grids = [], []
        for clip in clips:
            frames = clip.images()
            if len(frames) % t:
                frames = frames + frames[-1:] * (t - len(frames) % t)
            out = self.image_processor(images=frames, return_tensors="pt")
            frame_grids = out["image_grid_thw"]
            _, gh, gw = frame_grids[0].tolist()
            n, p = gh * gw, self.patch_size
            # the image processor repeats each frame t times along the temporal axis: keep one copy, pair the frames
            patches = out["pixel_values"].view(len(frames), n, 3, t, p, p)[:, :, :, 0]
            patches = patches.view(len(frames) // t, t, n, 3, p, p).permute(0, 2, 3, 1, 4, 5)
            pixels.append(patches.reshape(-1, 3 * t * p * p))
            grids.append([len(frames) // t, gh, gw])
        return {"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.tensor(grids)}

    def _frames(self, clips: list[Video]) -> dict:
        ip = self.image_processor
        size = ip.crop_size if getattr(ip, "crop_size", None) else ip.size
        h, w = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
        mean = torch.tensor(ip.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(ip.image_std, dtype=torch.float32)[:, None, None]
        stacks = []
        for clip in clips:
            resized = [np.asarray(f.resize((w, h), Image.Resampling.BICUBIC)) for f in clip.images()]
            pixels = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255.0
            stacks.append((pixels - mean) / std)
        if len({len(s) for s in stacks}) != 1:
            raise ValueError(
                f"the videos of one call need the same number of frames, got {[len(s) for s in stacks]}: "
                "sample them with the same num_frames"
            )
        return {"pixel_values_videos": torch.stack(stacks)}


def ensure_video_processor(processor):
    """`processor` itself, given a `FramesVideoProcessor` when it has no usable video processor (a processor
    loaded without torchvision, or vtc's offline tiny processors). A processor with a real one is left alone."""
    if getattr(processor, "video_processor", None) is not None:
        return processor
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise ValueError(f"{type(processor).__name__} has no image processor to build a video processor from")
    layout = "patches" if hasattr(image_processor, "temporal_patch_size") else "frames"
    processor.video_processor = FramesVideoProcessor(image_processor, layout)
    return processor
