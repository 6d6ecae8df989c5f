"""vtc.video: decoding with transformers' load_video (decord / PyAV), its errors, and the torchvision-free video
processor checked against the families' image processors and processors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.utils import is_av_available, is_decord_available

from vtc import video
from vtc.video import FramesVideoProcessor, as_video, ensure_video_processor, load_video

CLIP = Path(__file__).resolve().parents[1] / "assets" / "shapes.mp4"  # 16 frames, 224 x 224, 8 fps
BACKENDS = [b for b, ok in (("decord", is_decord_available()), ("pyav", is_av_available())) if ok]


def _pyav_frames(path: Path) -> np.ndarray:
    """Every frame of `path` decoded by PyAV directly: the reference the loader's sampled frames come from."""
    av = pytest.importorskip("av")
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_frames_and_fps_sampling(backend):
    reference = _pyav_frames(CLIP)
    clip = load_video(CLIP, num_frames=4, backend=backend)
    assert clip.backend == backend and clip.path == str(CLIP)
    assert clip.frames.shape == (4, 224, 224, 3) and clip.frames.dtype == np.uint8
    assert clip.indices == [0, 4, 8, 12] and clip.fps == 8.0 and clip.total_frames == 16
    assert clip.timestamps == [0.0, 0.5, 1.0, 1.5]
    # decord and PyAV share FFmpeg's H.264 decoder; the RGB conversion may differ by rounding only
    diff = np.abs(clip.frames.astype(int) - reference[clip.indices].astype(int))
    assert diff.mean() < 1.0, diff.mean()
    by_fps = load_video(CLIP, fps=2.0, backend=backend)  # 2 s of video at 2 frames/s
    assert by_fps.indices == [0, 4, 8, 12]
    assert load_video(CLIP, max_frames=4, backend=backend).indices == clip.indices
    assert load_video(CLIP, fps=4.0, max_frames=4, backend=backend).indices == clip.indices  # 8 frames capped
    assert load_video(CLIP, max_frames=40, backend=backend).indices == list(range(16))
    every = load_video(CLIP, backend=backend)
    assert len(every) == 16 and every.indices == list(range(16))
    meta = clip.metadata
    assert meta.timestamps == clip.timestamps and list(meta.frames_indices) == clip.indices


def test_default_backend_is_decord_where_installed():
    expected = "decord" if is_decord_available() else "pyav" if is_av_available() else None
    assert video.available_backend() == expected


def test_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        load_video(missing)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(CLIP.read_bytes()[:1500])  # cut before the moov atom
    with pytest.raises(ValueError, match="corrupt.mp4"):
        load_video(corrupt)
    with pytest.raises(ValueError, match=r"shapes.mp4.*num_frames must be an int >= 1"):
        load_video(CLIP, num_frames=0)
    with pytest.raises(ValueError, match=r"shapes.mp4.*fps must be > 0"):
        load_video(CLIP, fps=0)
    with pytest.raises(ValueError, match=r"shapes.mp4.*exceeds"):
        load_video(CLIP, num_frames=17)
    with pytest.raises(ValueError, match="unknown video backend"):
        load_video(CLIP, backend="ffmpeg-by-hand")


def test_no_video_stream(tmp_path):
    av = pytest.importorskip("av")
    audio = tmp_path / "tone.mka"
    with av.open(str(audio), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        samples = (np.sin(np.arange(800) / 5) * 3000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(ValueError, match=r"tone.mka has no video stream \(only audio\)"):
        load_video(audio)


def test_as_video_takes_frames_and_rejects_bad_input():
    from vtc.testing.qwen2_vl import make_video

    frames = make_video(0, frames=3)
    clip = as_video(frames)
    assert clip.backend == "frames" and clip.frames.shape == (3, 56, 84, 3) and clip.timestamps is None
    assert np.array_equal(as_video(clip.frames).frames, clip.frames)
    with pytest.raises(ValueError, match="at least one frame"):
        as_video(np.zeros((0, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        as_video(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(TypeError, match="a video is a file path"):
        as_video(42)


def test_qwen_patches_equal_the_image_processor_per_frame():
    """Oracle: the image processor repeats one frame along the temporal patch axis; a video's temporal patch holds
    frame 2k at t=0 and frame 2k+1 at t=1. An odd frame count repeats the last frame."""
    from vtc.testing.qwen2_vl import make_video, tiny_qwen_processor

    ip = tiny_qwen_processor().image_processor
    frames = make_video(0, frames=3)
    out = FramesVideoProcessor(ip, "patches")([frames])
    t, gh, gw = out["video_grid_thw"][0].tolist()
    assert t == 2
    p = ip.patch_size
    got = out["pixel_values_videos"].view(t, gh * gw, 3, 2, p, p)
    for k, frame in enumerate([*frames, frames[-1]]):
        single = ip(images=[frame], return_tensors="pt")["pixel_values"].view(gh * gw, 3, 2, p, p)
        assert torch.equal(got[k // 2, :, :, k % 2], single[:, :, 0])


def test_hf_processors_take_videos_through_their_chat_template():
    """OneVision: the processor's own __call__ with the frames video processor gives the token count the model
    expects (frames x pooled grid + 1 newline), and pixels that are the frames resized and normalised."""
    from vtc.testing.llava_next import make_video, tiny_llava_onevision_processor

    processor = ensure_video_processor(tiny_llava_onevision_processor())
    assert ensure_video_processor(processor).video_processor is processor.video_processor  # once
    clip = make_video(0, frames=3)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what moves ?"}]}],
        add_generation_prompt=True,
    )
    out = processor(text=[text], videos=[clip], return_tensors="pt")
    assert (out["input_ids"] == processor.video_token_id).sum() == 3 * 2 * 2 + 1
    ip = processor.image_processor
    first = np.asarray(clip[0].resize((42, 42), resample=3), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(first).permute(2, 0, 1) - torch.tensor(ip.image_mean)[:, None, None]) / torch.tensor(
        ip.image_std
    )[:, None, None]
    torch.testing.assert_close(out["pixel_values_videos"][0, 0], expected)


def _image_only(cls):
    """`cls` (a HF Qwen-VL processor class) built without its video processor (that needs torchvision)."""

    class ImageOnly(cls):
        video_processor = None

        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return ImageOnly


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_frame_timestamps_reach_the_qwen_prompts(family):
    """The decoded clip's frame indices and fps reach the processors: Qwen2.5-VL's seconds per temporal patch
    (temporal_patch_size / sampled fps) and Qwen3-VL's "<t seconds>" before each temporal patch (mean of its pair)."""
    from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vtc.testing.qwen2_vl import QWEN_CHAT_TEMPLATE, tiny_qwen_tokenizer

    cls, patch = (Qwen2_5_VLProcessor, 14) if family == "qwen2_5_vl" else (Qwen3VLProcessor, 16)
    side = 2 * patch
    ip = Qwen2VLImageProcessorPil(
        size={"shortest_edge": side**2, "longest_edge": 4 * side**2},
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
    )
    processor = ensure_video_processor(
        _image_only(cls)(image_processor=ip, tokenizer=tiny_qwen_tokenizer(), chat_template=QWEN_CHAT_TEMPLATE)
    )
    clip = load_video(CLIP, num_frames=4)  # frames 0, 4, 8, 12 of an 8 fps clip: 0, 0.5, 1, 1.5 s
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what ?"}]}],
        add_generation_prompt=True,
    )
    out = processor(
        text=[text], videos=[clip.frames], video_metadata=[clip.metadata], do_sample_frames=False, return_tensors="pt"
    )
    assert out["video_grid_thw"][0, 0] == 2
    if family == "qwen2_5_vl":
        assert out["second_per_grid_ts"].tolist() == [2 / (4 / 16 * 8)]
    else:
        prompt = processor.tokenizer.decode(out["input_ids"][0]).replace(" ", "")
        pairs = [f"<{(a + b) / 2:.1f}seconds>" for a, b in zip(clip.timestamps[::2], clip.timestamps[1::2])]
        where = [prompt.find(p) for p in pairs]
        assert -1 not in where and where == sorted(where), (pairs, prompt)
