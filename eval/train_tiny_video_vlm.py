"""Train the tiny Qwen2-VL shipped in assets/tiny_video_vlm on the moving-shapes clips of `vtc.data` (issue 22).

The model is a real `transformers.Qwen2VLForConditionalGeneration`: the Qwen2-VL vision tower (14 px patches,
temporal patches of 2 frames, 2x2 patch merger; its attention stays within one temporal patch, as in Qwen2-VL)
and a Qwen2 decoder with M-RoPE (temporal / height / width sections), a word-level tokenizer over the task's
words and Qwen's special tokens. A clip is 8 frames of 112 px: 4 temporal patches x 4 x 4 merged tokens = 64
visual tokens. Every clip comes from a training stream (batch `step` from seed `vtc.data.train_seed(step)`), never
from the held-out seed.

One stage, end to end (vision tower, merger and decoder together), each step on `--clips` fresh clips, every clip
asked each question kind it answers (`vtc.data.ask_video`; the vision tower runs once per clip, its tokens are
shared by the clip's questions through `mm_encoder_outputs`). Losses:
- answers: cross-entropy on the answer word and its <|im_end|>, averaged per question kind;
- auxiliary, on the merged visual tokens (what the decoder reads): the (colour, shape) pair covering the token's
  28 px cell in its two frames (or background) and whether that object moves (the vision tower sees both frames
  of a temporal patch, so motion is visible within one token), and the projector alignment of the image script
  (an object's tokens point like the embeddings of its colour and shape words);
- grounding (as in eval/train_tiny_vlm.py): in decoder layer `--ground-layer`, one head per question kind puts the
  answer position's attention on the tokens the answer depends on: the moving object (moves), the late object
  (appears), the first object in its first temporal patch (first); for enters, spread over the first token and
  each entering object's tokens in the temporal patch where it enters (so the mass off the first token counts
  them).
Frozen-feature caching (as the image script does) does not apply: the tower trains with the rest, and it is small.

    python eval/train_tiny_video_vlm.py --threads 1     # full run (resumes from out/tiny_video_vlm/checkpoint.pt)
    python eval/train_tiny_video_vlm.py --smoke         # a few steps on one batch: asserts the loss goes down

At the end the fp16 weights, config, tokenizer, processor and chat template are written to `--out`. The shipped
weights: the defaults with `--threads 1` (1 thread ran several times faster than 2 on the shared 2-core machine),
1,683 s; assets/tiny_video_vlm/README.md says how they were run.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vtc import data
from vtc.testing.qwen2_vl import (
    MERGE,
    PATCH,
    QWEN_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    TEMPORAL,
    VIDEO_PAD,
    special_token_ids,
    tiny_qwen2_vl_processor,
)
from vtc.video import ensure_video_processor

ROOT = Path(__file__).resolve().parents[1]
ASSET_DIR = ROOT / "assets" / "tiny_video_vlm"
TEMPLATE_WORDS = ["user", "assistant", "system"]
PAIRS = [(c, s) for c in data.COLOURS for s in data.SHAPES]
PAIR_INDEX = {p: i for i, p in enumerate(PAIRS)}
CELL = PATCH * MERGE  # px side of one merged token
GRID = data.VIDEO_SIZE // CELL  # merged tokens per side
GROUPS = data.VIDEO_FRAMES // TEMPORAL  # temporal patches per clip
TOKENS = GROUPS * GRID * GRID
MIN_CELL_PIXELS = 30  # a token is labelled with an object covering at least this many pixels of its two frames
GROUND_HEAD = {"moves": 0, "appears": 1, "enters": 2, "first": 3}
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 1000
    clips: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 50
    aux_weight: float = 1.0
    align_weight: float = 1.0
    ground_weight: float = 0.3
    ground_layer: int = 1
    vision_hidden: int = 64
    vision_layers: int = 2
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    rope_theta: float = 1e6


# --- tokenizer, processor, model ------------------------------------------------------------------------
def build_tokenizer():
    """Word-level tokenizer (lower-cased) over Qwen's special tokens, the chat template's words and the task's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*QWEN_SPECIAL_TOKENS, *TEMPLATE_WORDS, *data.video_vocabulary()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(QWEN_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", padding_side="left")


def build_processor(tokenizer=None):
    """`Qwen2VLProcessor` (tiny_qwen2_vl_processor) for 112 px frames, with a `FramesVideoProcessor`."""
    side = data.VIDEO_SIZE
    processor = tiny_qwen2_vl_processor(min_pixels=28 * 28, max_pixels=side * side,
                                        tokenizer=tokenizer or build_tokenizer())
    return ensure_video_processor(processor)


def build_model(tokenizer, cfg: TrainConfig):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    head_dim = cfg.text_hidden // cfg.text_heads
    unit = head_dim // 16  # the sections (t, h, w) split head_dim / 2 as 2:3:3, as Qwen2-VL does (16, 24, 24)
    text = dict(vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_hidden * 4,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                num_key_value_heads=cfg.text_heads, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                                 "mrope_section": [unit * 2, unit * 3, unit * 3]},
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                tie_word_embeddings=False)
    vision = dict(depth=cfg.vision_layers, embed_dim=cfg.vision_hidden, hidden_size=cfg.text_hidden, num_heads=4,
                  mlp_ratio=4, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                           **special_token_ids(tokenizer))
    torch.manual_seed(cfg.seed)
    return Qwen2VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")


def linear_patch_embed(model) -> None:
    """Training speed-up: the vision tower's Conv3d patch embedding (kernel = stride = the whole patch, no bias) is
    a linear map of the flattened patch; CPU Conv3d backward is slow, so this instance computes it as one matmul
    with the same weight (same result). Not in the shipped model (saved weights are the Conv3d's)."""
    embed = model.model.visual.patch_embed

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        weight = embed.proj.weight
        return F.linear(hidden_states.to(weight.dtype), weight.view(weight.shape[0], -1))

    embed.forward = forward


def batched_vision_attention(model) -> None:
    """Training speed-up: the vision tower attends within each temporal patch of each clip (`cu_seqlens`); with
    SDPA, transformers runs one attention call per chunk (4 per clip). All chunks here have the same length, so
    this instance's vision attention runs them as one batch: same computation (checked in `check_speedups`)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    for block in model.model.visual.blocks:
        attn = block.attn

        def forward(hidden_states, cu_seqlens, position_embeddings=None, attn=attn, **_):
            n, heads = hidden_states.shape[0], attn.num_heads
            chunk = int(cu_seqlens[1] - cu_seqlens[0])
            q, k, v = attn.qkv(hidden_states).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
            q, k, v = (x.reshape(n // chunk, chunk, heads, -1).transpose(1, 2) for x in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
            return attn.proj(out.transpose(1, 2).reshape(n, -1))

        attn.forward = forward


def fast_vision(model) -> None:
    """Both training speed-ups, checked against the tower's own forward on one batch of clips."""
    pixels = patchify(np.stack([c["frames"] for c in draw_clips(0, range(3))]))
    grid = torch.tensor([[GROUPS, GRID * MERGE, GRID * MERGE]]).repeat(3, 1)
    with torch.no_grad():
        before = model.model.visual(pixels, grid_thw=grid).pooler_output
        linear_patch_embed(model)
        batched_vision_attention(model)
        after = model.model.visual(pixels, grid_thw=grid).pooler_output
    assert torch.allclose(before, after, atol=1e-4), f"fast vision differs: {(before - after).abs().max()}"


class AuxHeads(torch.nn.Module):
    """Training-only heads on the merged visual tokens (not shipped): the pair covering the token, motion."""

    def __init__(self, hidden: int):
        super().__init__()
        self.pair = torch.nn.Linear(hidden, len(PAIRS) + 1)
        self.moving = torch.nn.Linear(hidden, 1)


# --- batches --------------------------------------------------------------------------------------------
def patchify(frames: np.ndarray) -> torch.Tensor:
    """(clips, T, H, W, 3) uint8 -> Qwen2-VL video patches (clips * TOKENS * 4, 3 * 2 * 14 * 14), as the
    processor makes them (checked against it by `check_patchify`)."""
    x = (frames.astype(np.float32) / 255.0 - MEAN) / STD
    b = x.shape[0]
    g, m = GRID, MERGE
    x = x.reshape(b, GROUPS, TEMPORAL, g, m, PATCH, g, m, PATCH, 3)
    # -> clips, groups, rows, cols, merge-row, merge-col, channel, temporal, patch-row, patch-col
    x = x.transpose(0, 1, 3, 6, 4, 7, 9, 2, 5, 8)
    return torch.from_numpy(np.ascontiguousarray(x).reshape(-1, 3 * TEMPORAL * PATCH * PATCH))


def check_patchify(processor) -> None:
    sample = data.make_video_qa(1, 0)[0]
    ours = patchify(np.stack([np.asarray(f) for f in sample["video"]])[None])
    theirs = processor.video_processor([sample["video"]])["pixel_values_videos"]
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5), "patchify != processor"


def token_objects(masks: np.ndarray) -> np.ndarray:
    """(TOKENS,) index of the object covering each merged token in its two frames (-1: none)."""
    cells = masks.reshape(GROUPS, TEMPORAL, GRID, CELL, GRID, CELL)
    n = int(masks.max())
    if n == 0:
        return np.full(TOKENS, -1)
    counts = np.stack([(cells == k + 1).sum(axis=(1, 3, 5)) for k in range(n)], -1)  # groups, rows, cols, n
    best = counts.argmax(-1)
    return np.where(counts.max(-1) >= MIN_CELL_PIXELS, best, -1).reshape(-1)


def draw_clips(seed: int, indices) -> list[dict]:
    clips = []
    for i in indices:
        rng = np.random.default_rng((seed, i))
        objects = data.video_layout(rng)
        frames, masks = data.render_clip(objects, rng)
        clips.append({"objects": objects, "frames": np.stack([np.asarray(f) for f in frames]),
                      "owner": token_objects(masks)})
    return clips


def ground_weights(kind: str, objects: list[dict], owner: np.ndarray, start: int, length: int) -> torch.Tensor:
    """Target weights of the answer attention over a row of `length` tokens whose video tokens start at `start`
    and whose first real token is at `start - 3` (see the module docstring). Zero everywhere: no target."""
    w = torch.zeros(length)
    group = np.arange(TOKENS) // (GRID * GRID)
    video = slice(start, start + TOKENS)
    if kind == "moves":
        target = next(k for k, o in enumerate(objects) if o["vx"] or o["vy"])
        w[video] = torch.from_numpy(owner == target).float()
    elif kind == "appears":
        target = next(k for k, o in enumerate(objects) if o["enter"] >= data.VIDEO_FRAMES // 2)
        w[video] = torch.from_numpy(owner == target).float()
    elif kind == "first":
        target = min(range(len(objects)), key=lambda k: objects[k]["enter"])
        first_group = objects[target]["enter"] // TEMPORAL
        w[video] = torch.from_numpy((owner == target) & (group == first_group)).float()
    elif kind == "enters":
        w[start - 3] = 1.0
        for k, o in enumerate(objects):
            if o["enter"] > 0:
                tokens = torch.from_numpy((owner == k) & (group == o["enter"] // TEMPORAL)).float()
                if tokens.sum() > 0:
                    w[video] += tokens / tokens.sum()
        w /= w.sum()
    return w


def make_batch(processor, clips: list[dict]) -> dict:
    """One row per (clip, question it answers): prompt, answer word, <|im_end|>, left padded."""
    tok = processor.tokenizer
    video_id = tok.convert_tokens_to_ids(VIDEO_PAD)
    texts, row_clip, kinds = [], [], []
    for c, clip in enumerate(clips):
        for kind in data.VIDEO_KINDS:
            qa = data.ask_video(kind, clip["objects"])
            if qa is None:
                continue
            messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": qa[0]}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            texts.append(text.replace(VIDEO_PAD, VIDEO_PAD * TOKENS) + f"{qa[1]}<|im_end|>")
            row_clip.append(c)
            kinds.append(kind)
    enc = tok(texts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    length = ids.shape[1]
    starts = (ids == video_id).int().argmax(1)
    weights = torch.stack([ground_weights(k, clips[c]["objects"], clips[c]["owner"], int(s), length)
                           for k, c, s in zip(kinds, row_clip, starts)])
    pair = torch.full((len(clips), TOKENS), len(PAIRS), dtype=torch.long)
    moving = torch.zeros(len(clips), TOKENS)
    for c, clip in enumerate(clips):
        for k, o in enumerate(clip["objects"]):
            on = torch.from_numpy(clip["owner"] == k)
            pair[c, on] = PAIR_INDEX[(o["colour"], o["shape"])]
            moving[c, on] = float(bool(o["vx"] or o["vy"]))
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == video_id).long() * 2,
            "row_clip": torch.tensor(row_clip), "kinds": kinds, "ground_weights": weights, "pair": pair,
            "moving": moving, "pair_word_ids": torch.tensor([tok.convert_tokens_to_ids(list(p)) for p in PAIRS]),
            "pixel_values_videos": patchify(np.stack([c["frames"] for c in clips]))}


# --- forward --------------------------------------------------------------------------------------------
class AttentionInputs:
    """Keeps what one decoder layer's self-attention was called with (hidden states, M-RoPE cos/sin)."""

    def __init__(self, attention: torch.nn.Module):
        self.attention = attention
        self.handle = attention.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs) -> None:
        self.hidden, self.rope = kwargs["hidden_states"], kwargs["position_embeddings"]

    def remove(self) -> None:
        self.handle.remove()


def grounding_loss(inputs: AttentionInputs, batch: dict) -> torch.Tensor:
    """-log attention mass on the target tokens (spread targets, enters: cross-entropy to the spread), for the
    position that predicts the answer (length - 3), in the head `GROUND_HEAD` gives the row's kind."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

    attention, hidden, (cos, sin) = inputs.attention, inputs.hidden, inputs.rope
    rows, length = hidden.shape[:2]
    query = length - 3
    d = attention.head_dim
    heads = torch.tensor([GROUND_HEAD[k] for k in batch["kinds"]])
    ar = torch.arange(rows)
    q = attention.q_proj(hidden[:, query]).view(rows, -1, d)[ar, heads]
    k = attention.k_proj(hidden).view(rows, length, -1, d)[ar, :, heads // attention.num_key_value_groups]
    q = q * cos[:, query] + rotate_half(q) * sin[:, query]
    k = k * cos + rotate_half(k) * sin
    scores = (q[:, None] * k).sum(-1) * attention.scaling
    allowed = batch["attention_mask"].bool() & (torch.arange(length) <= query)
    log_p = scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)
    w = batch["ground_weights"]
    has = w.sum(-1) > 0
    spread = torch.tensor([k == "enters" for k in batch["kinds"]])
    on_target = -log_p.masked_fill(w == 0, float("-inf")).logsumexp(-1)
    spread_out = -(w * log_p.masked_fill(w == 0, 0)).sum(-1)
    loss = torch.where(spread, spread_out, on_target)
    return loss[has].mean()


def align_loss(model, tokens: torch.Tensor, pair: torch.Tensor, pair_word_ids: torch.Tensor) -> torch.Tensor:
    """Projector alignment (as eval/train_tiny_vlm.py): a visual token covering an object points like the sum of
    the word embeddings of its colour and shape (1 - cosine; background free)."""
    on_object = pair < len(PAIRS)
    if not on_object.any():
        return tokens.sum() * 0
    table = model.model.get_input_embeddings().weight.detach()
    target = table[pair_word_ids[pair[on_object]]].sum(1)
    return (1 - F.cosine_similarity(tokens[on_object], target, dim=-1)).mean()


def forward(model, heads: AuxHeads, batch: dict, align_weight: float = 1.0):
    """(per-kind answer loss, auxiliary loss (alignment included), answer logits (rows, 2, V))."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    n_clips = batch["pair"].shape[0]
    grid = torch.tensor([[GROUPS, GRID * MERGE, GRID * MERGE]])
    tokens = model.model.visual(batch["pixel_values_videos"], grid_thw=grid.repeat(n_clips, 1)).pooler_output
    tokens = tokens.view(n_clips, TOKENS, -1)
    aux = F.cross_entropy(heads.pair(tokens).flatten(0, 1), batch["pair"].flatten()) + \
        F.binary_cross_entropy_with_logits(heads.moving(tokens).squeeze(-1), batch["moving"])
    aux = aux + align_weight * align_loss(model, tokens, batch["pair"], batch["pair_word_ids"])
    per_row = [tokens[c] for c in batch["row_clip"].tolist()]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                mm_token_type_ids=batch["mm_token_type_ids"], video_grid_thw=grid.repeat(len(per_row), 1),
                mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=per_row)}, logits_to_keep=3)
    logits = out.logits[:, :2]  # predicting the answer word and <|im_end|>
    targets = batch["input_ids"][:, -2:]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(-1, 2).mean(-1)
    kinds = np.array(batch["kinds"])
    answer = torch.stack([loss[torch.from_numpy(kinds == k)].mean() for k in sorted(set(batch["kinds"]))]).mean()
    return answer, aux, logits


# --- evaluation -----------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_accuracy(model, processor, n: int = 200, chunk: int = 25) -> tuple[float, dict[str, float]]:
    """Greedy first-token accuracy on the first `n` held-out clips, through the processor (the inference path);
    (overall, by kind)."""
    was_training = model.training
    model.eval()
    samples = data.make_video_qa(n, data.HELDOUT_SEED)
    right: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, n, chunk):
        part = samples[start:start + chunk]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": s["question"]}]}],
            add_generation_prompt=True) for s in part]
        inputs = processor(text=texts, videos=[s["video"] for s in part], return_tensors="pt", padding=True)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        words = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        for w, s in zip(words, part):
            right[s["kind"]].append(w == s["answer"])
    model.train(was_training)
    total = sum(sum(v) for v in right.values()) / n
    return total, {k: sum(right[k]) / len(right[k]) for k in data.VIDEO_KINDS if right[k]}


# --- training -------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(cfg: TrainConfig, workdir: Path, out_dir: Path | None, ckpt_every: int = 50, eval_every: int = 100,
          fixed_batch: bool = False, progress: bool = True, time_limit: float | None = None) -> list[float]:
    torch.manual_seed(cfg.seed)
    processor = build_processor()
    check_patchify(processor)
    model = build_model(processor.tokenizer, cfg).train()
    fast_vision(model)
    heads = AuxHeads(cfg.text_hidden)
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = workdir / "checkpoint.pt"
    step = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        architecture = ("seed", "vision_hidden", "vision_layers", "text_hidden", "text_layers", "text_heads",
                        "rope_theta")
        if any(state["config"].get(k) != getattr(cfg, k) for k in architecture):
            raise ValueError(f"{ckpt_path} was written for another model; delete it or pass the same options")
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resumed from {ckpt_path} at step {step}")
    attn_inputs = AttentionInputs(model.model.language_model.layers[cfg.ground_layer].self_attn)
    losses, log = [], []
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, dynamic_ncols=True)
    fixed = None
    started = time.time()
    while step < cfg.steps and not (time_limit and time.time() - started > time_limit):
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if fixed_batch:
            fixed = fixed or make_batch(processor, draw_clips(0, range(cfg.clips)))
            batch = fixed
        else:
            batch = make_batch(processor, draw_clips(data.train_seed(step), range(cfg.clips)))
        answer, aux, _ = forward(model, heads, batch, cfg.align_weight)
        ground = grounding_loss(attn_inputs, batch)
        loss = answer + cfg.aux_weight * aux + cfg.ground_weight * ground
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(answer=f"{answer.item():.3f}", aux=f"{aux.item():.3f}", ground=f"{ground.item():.3f}",
                        lr=f"{lr:.1e}")
        log.append(f"{step} answer={answer.item():.4f} aux={aux.item():.4f} ground={ground.item():.4f} "
                   f"t={time.time() - started:.0f}s")
        out_of_time = bool(time_limit and time.time() - started > time_limit)
        if step % ckpt_every == 0 or step == cfg.steps or out_of_time:
            torch.save({"model": model.state_dict(), "heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": step, "config": asdict(cfg)}, ckpt_path)
            with open(workdir / "train_log.txt", "a") as f:
                f.write("\n".join(log) + "\n")
            log = []
        if eval_every and (step % eval_every == 0 or step == cfg.steps or out_of_time):
            acc, by_kind = heldout_accuracy(model, processor)
            kinds = " ".join(f"{k}={v:.3f}" for k, v in by_kind.items())
            bar.write(f"step {step}: held-out first-token accuracy {acc:.1%} (200 clips) {kinds}")
            with open(workdir / "train_log.txt", "a") as f:
                f.write(f"{step} heldout_acc={acc:.4f} {kinds}\n")
    bar.close()
    attn_inputs.remove()
    if out_dir is not None:
        save_release(model, processor, out_dir)
    return losses


def save_release(model, processor, out_dir: Path) -> None:
    """fp16 safetensors, config, tokenizer, image processor and chat template: what `load_tiny_video_vlm` reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().half().save_pretrained(out_dir, safe_serialization=True)
    model.float()
    processor.tokenizer.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
    size = (out_dir / "model.safetensors").stat().st_size / 2**20
    print(f"wrote {out_dir} (model.safetensors: {size:.2f} MiB)")


def smoke(steps: int = 8, clips: int = 6, progress: bool = False) -> list[float]:
    """`steps` steps on one fixed batch of `clips` clips in a temporary directory; asserts the loss goes down."""
    cfg = TrainConfig(steps=steps, clips=clips, warmup=1)
    with tempfile.TemporaryDirectory() as tmp:
        losses = train(cfg, Path(tmp), None, ckpt_every=steps, eval_every=0, fixed_batch=True, progress=progress)
    assert losses[-1] < losses[0], f"loss did not go down: {losses}"
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few steps on one batch; asserts the loss goes down")
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "tiny_video_vlm", help="checkpoint and log")
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="where the trained model is written")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--ckpt-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--time-limit", type=float, default=None, help="seconds: stop early, save what there is")
    for name, value in asdict(TrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        start = time.time()
        losses = smoke(progress=True)
        print(f"smoke OK in {time.time() - start:.1f}s: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        return
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
    start = time.time()
    train(cfg, args.workdir, args.out, ckpt_every=args.ckpt_every, eval_every=args.eval_every,
          time_limit=args.time_limit)
    print(f"training took {time.time() - start:.0f}s in this invocation")
    if args.workdir.exists() and args.out.exists():
        shutil.copy(args.workdir / "train_log.txt", args.out / "train_log.txt")


if __name__ == "__main__":
    main()
