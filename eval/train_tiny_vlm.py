"""Train the tiny LLaVA shipped in assets/tiny_vlm on the synthetic grounding task of `vtc.data` (issue 10).

The model is a real `transformers.LlavaForConditionalGeneration`: a CLIP ViT with a [CLS] token (224 px
images, 16 px patches: 196 visual tokens), the LLaVA MLP projector and a Llama decoder, with a word-level
tokenizer over the task's vocabulary. Training has two stages; every picture comes from a training stream
(batch `step` of the vision stage from seed `vtc.data.train_seed(step)`), never from the held-out seed:

1. vision: the ViT alone, on auxiliary objectives: the [CLS] output predicts which (colour, shape) pairs are
   in the picture (multi-label, as CLIP's [CLS] summarises the picture, so its attention points at the
   objects), and every patch token predicts the (colour, shape) pair covering it, whether an object's centre
   lies in it, and its own row and column (without these, a linear probe finds no position in the patch
   features, and position questions stay at chance);
2. vqa: the projector and the decoder on the answers, the ViT frozen as stage 1 left it (`--freeze-vision`,
   the default: no backward pass through the ViT). Each picture is one conversation of up to
   `--questions-per-image` turns of different kinds (the first turn in the inference format), with the loss
   on every answer word and its </s>: one pass over the 196 visual tokens serves five answers. A
   projector-alignment loss (the role of LLaVA's stage-1 pretraining) points the visual tokens of an object
   like the word embeddings of its colour and its shape. The decoder's RoPE base
   is 1e6 (as in Qwen2), so that most rotary frequencies barely turn across the ~250 tokens of a prompt.
   With the ViT frozen, its features of `--cache-images` pictures (training stream `CACHE_SEED`) are computed
   once and kept in the work directory; every step then draws fresh questions about cached pictures.

The shipped weights: the defaults below, `--threads 2` (assets/tiny_vlm/README.md says how they were run).

    python eval/train_tiny_vlm.py                 # full run (resumes from out/tiny_vlm/checkpoint.pt)
    python eval/train_tiny_vlm.py --smoke         # a few steps on one batch: asserts the loss goes down

The checkpoint is written every `--ckpt-every` steps; rerunning the same command resumes from it. At the
end the fp16 weights, config, tokenizer and processor files are written to `--out` (assets/tiny_vlm).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vtc import data
from vtc.testing import LLAVA_CHAT_TEMPLATE

ROOT = Path(__file__).resolve().parents[1]
ASSET_DIR = ROOT / "assets" / "tiny_vlm"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", IMAGE_TOKEN]
TEMPLATE_WORDS = ["USER", "ASSISTANT", ":"]
PATCH = 16
GRID = data.IMAGE_SIZE // PATCH
PAIRS = [(c, s) for c in data.COLOURS for s in data.SHAPES]
PAIR_INDEX = {p: i for i, p in enumerate(PAIRS)}
MIN_PATCH_PIXELS = 16  # a patch is labelled with an object when it covers at least this many pixels of it
CACHE_SEED = 500_000  # the training stream of the VQA stage's feature cache (the vision stage uses 0 .. steps)


@dataclass
class TrainConfig:
    """Hyper-parameters; `steps_*` count optimizer steps."""

    seed: int = 0
    steps_vision: int = 300
    steps_vqa: int = 4400
    images_vision: int = 32
    images_vqa: int = 16
    questions_per_image: int = 5  # turns per conversation in the VQA stage
    freeze_vision: bool = True  # VQA stage: the ViT stays as the vision stage left it (a cheaper step)
    lr_vision: float = 2e-3
    lr_vqa: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    aux_weight_vqa: float = 0.3
    align_weight: float = 1.0
    cache_images: int = 6000  # frozen-ViT VQA stage: features of this many pictures, computed once (0: fresh)
    vision_hidden: int = 128
    vision_layers: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    rope_theta: float = 1e6  # long wavelengths: content, not distance, decides what the answer attends to


# --- tokenizer, processor, model ------------------------------------------------------------------------
def build_tokenizer():
    """Word-level tokenizer over the task's words, the chat template's words and the special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL_TOKENS, *TEMPLATE_WORDS, *data.vocabulary()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )


def build_processor(tokenizer=None):
    """LLaVA-1.5-style processor: CLIP pixel preprocessing (PIL backend, no torchvision) + the tokenizer."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = data.IMAGE_SIZE
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or build_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def build_model(tokenizer, cfg: TrainConfig):
    """A randomly initialised `LlavaForConditionalGeneration` of the shipped size (fp32)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * 4,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=4,
        image_size=data.IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_hidden * 4,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=GRID * GRID,
    )
    torch.manual_seed(cfg.seed)
    return LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")


class AuxHeads(torch.nn.Module):
    """Training-only heads on the vision tower (not shipped): [CLS] -> pairs present; patch -> pair, centre."""

    def __init__(self, hidden: int):
        super().__init__()
        self.cls = torch.nn.Linear(hidden, len(PAIRS))
        self.patch = torch.nn.Linear(hidden, len(PAIRS) + 1)
        self.centre = torch.nn.Linear(hidden, 1)
        self.row = torch.nn.Linear(hidden, GRID)
        self.col = torch.nn.Linear(hidden, GRID)


# --- batches --------------------------------------------------------------------------------------------
def scene_targets(objects: list[dict], mask: np.ndarray) -> dict[str, torch.Tensor]:
    """Per-picture targets: "present" (P,) pairs in the picture; per patch (GRID*GRID,): "patch_label" (the pair
    covering it, P = background) and "centre" (an object's centre lies in it)."""
    present = torch.zeros(len(PAIRS))
    label = torch.full((GRID * GRID,), len(PAIRS), dtype=torch.long)
    centre = torch.zeros(GRID * GRID)
    best = np.zeros((GRID, GRID), dtype=np.int64)
    for k, obj in enumerate(objects):
        pair = PAIR_INDEX[(obj["colour"], obj["shape"])]
        present[pair] = 1
        cover = (mask == k + 1).reshape(GRID, PATCH, GRID, PATCH).sum(axis=(1, 3))
        take = (cover >= MIN_PATCH_PIXELS) & (cover > best)
        best[take] = cover[take]
        label[torch.from_numpy(take.reshape(-1))] = pair
        centre[(obj["y"] // PATCH) * GRID + obj["x"] // PATCH] = 1
    return {"present": present, "patch_label": label, "centre": centre}


def prompt(processor, question: str) -> str:
    """The chat prompt of one question (LLaVA-1.5 format, generation prompt added)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def conversation(processor, asked: list[tuple[str, str, bool]]) -> str:
    """One image's conversation: the first turn exactly as at inference (`prompt`), the others appended."""
    first_q, first_a, _ = asked[0]
    text = prompt(processor, first_q) + f" {first_a}</s>"
    for question, answer, _ in asked[1:]:
        text += f" USER: {question} ASSISTANT: {answer}</s>"
    return text


def answer_labels(input_ids: torch.Tensor, assistant_id: int, colon_id: int) -> torch.Tensor:
    """(B, L) targets: the answer word and the </s> after every "ASSISTANT :", -100 elsewhere."""
    labels = torch.full_like(input_ids, -100)
    starts = (input_ids[:, :-3] == assistant_id) & (input_ids[:, 1:-2] == colon_id)
    rows, cols = starts.nonzero(as_tuple=True)
    for shift in (2, 3):
        labels[rows, cols + shift] = input_ids[rows, cols + shift]
    return labels


def draw_scenes(seed: int, indices: range) -> list[dict]:
    """Pictures `indices` of stream `seed`, each with its objects, targets and the rng that asks its questions."""
    scenes = []
    for i in indices:
        rng = np.random.default_rng((seed, i))
        image, objects, mask = data.render_scene(rng)
        scenes.append({"image": image, "objects": objects, "targets": scene_targets(objects, mask), "rng": rng})
    return scenes


def ask_conversation(objects: list[dict], rng: np.random.Generator, questions: int) -> list[tuple[str, str, bool]]:
    """Up to `questions` (question, answer, small) turns of different kinds about one picture (at least one)."""
    asked = []
    for kind in rng.permutation(data.KINDS):
        qa = data.ask(str(kind), objects, rng)
        if qa is not None:
            asked.append(qa)
        if len(asked) == questions:
            break
    return asked


def make_batch(processor, scenes: list[dict], questions: int, with_pixels: bool = True) -> dict:
    """One row per scene: a conversation of up to `questions` turns of different kinds (the first turn in the
    inference format), asked with each scene's rng.

    Returns the token batch (left padded) with `labels` on every answer word and its </s>, the stacked scene
    targets and, if `with_pixels`, the pixels."""
    texts = [conversation(processor, ask_conversation(sc["objects"], sc["rng"], questions)) for sc in scenes]
    texts = [t.replace(IMAGE_TOKEN, IMAGE_TOKEN * (GRID * GRID)) for t in texts]
    tok = processor.tokenizer
    tokens = tok(texts, return_tensors="pt", padding=True)
    labels = answer_labels(tokens["input_ids"], *tok.convert_tokens_to_ids(["ASSISTANT", ":"]))
    batch = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], "labels": labels,
             "pair_word_ids": torch.tensor([tok.convert_tokens_to_ids(list(p)) for p in PAIRS])}
    for key in scenes[0]["targets"]:
        batch[key] = torch.stack([scene["targets"][key] for scene in scenes])
    if with_pixels:
        batch["pixel_values"] = processor.image_processor([sc["image"] for sc in scenes], return_tensors="pt")[
            "pixel_values"]
    return batch


@torch.no_grad()
def build_feature_cache(model, processor, n: int, chunk: int = 32, progress: bool = True) -> dict:
    """Frozen-ViT features (n, GRID*GRID, D) fp16 of the pictures of stream `CACHE_SEED`, with their objects
    and targets: the VQA stage then skips drawing, preprocessing and the ViT at every step."""
    was_training = model.training
    model.eval()
    features, scenes = [], []
    for start in tqdm(range(0, n, chunk), desc="feature cache", disable=not progress, dynamic_ncols=True):
        drawn = draw_scenes(CACHE_SEED, range(start, min(start + chunk, n)))
        pixels = processor.image_processor([s["image"] for s in drawn], return_tensors="pt")["pixel_values"]
        features.append(vision_forward(model, pixels)[0].half())
        scenes += [{"objects": s["objects"], "targets": s["targets"]} for s in drawn]
    model.train(was_training)
    return {"features": torch.cat(features), "scenes": scenes}


def vision_fingerprint(model) -> float:
    """A checksum of the ViT's weights: a cache made by another ViT is not reused."""
    return float(sum(p.double().sum() for p in model.model.vision_tower.parameters()))


def load_or_build_cache(model, processor, path: Path, n: int, progress: bool = True) -> dict:
    """The VQA stage's feature cache: read from `path` when it holds `n` pictures made by this model's ViT,
    else built and written."""
    fingerprint = vision_fingerprint(model)
    if path.exists():
        cache = torch.load(path, weights_only=False)
        if len(cache["scenes"]) == n and cache.get("vision") == fingerprint:
            return cache
    cache = {**build_feature_cache(model, processor, n, progress=progress), "vision": fingerprint}
    torch.save(cache, path)
    return cache


def cached_batch(processor, cache: dict, step: int, n_images: int, questions: int) -> dict:
    """Batch `step` of the cached VQA stage: `n_images` cached pictures, fresh questions (seeded by step)."""
    rng = np.random.default_rng((data.train_seed(step), CACHE_SEED))
    picks = rng.choice(len(cache["scenes"]), size=n_images, replace=False)
    scenes = [{**cache["scenes"][i], "rng": np.random.default_rng((data.train_seed(step), int(i)))} for i in picks]
    batch = make_batch(processor, scenes, questions, with_pixels=False)
    batch["picks"] = torch.from_numpy(picks)
    batch["features"] = cache["features"][batch["picks"]].float()
    return batch


# --- forward --------------------------------------------------------------------------------------------
def vision_forward(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch features (I, N, D) at the LLaVA feature layer, [CLS] pooled output (I, D)).

    The patch features are those LLaVA's get_image_features feeds to the projector."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    patches = out.hidden_states[model.config.vision_feature_layer][:, 1:]
    return patches, out.pooler_output


def aux_loss(heads: AuxHeads, patches: torch.Tensor, pooled: torch.Tensor, batch: dict) -> torch.Tensor:
    """Multi-label [CLS] loss + per-patch pair, centre and own row/column losses (the last two keep where a patch
    lies in its feature, which position questions need)."""
    cls = F.binary_cross_entropy_with_logits(heads.cls(pooled), batch["present"])
    patch = F.cross_entropy(heads.patch(patches).flatten(0, 1), batch["patch_label"].flatten())
    centre = F.binary_cross_entropy_with_logits(heads.centre(patches).squeeze(-1), batch["centre"])
    index = torch.arange(GRID * GRID).expand(patches.shape[0], -1).flatten()
    row = F.cross_entropy(heads.row(patches).flatten(0, 1), index // GRID)
    col = F.cross_entropy(heads.col(patches).flatten(0, 1), index % GRID)
    return cls + patch + centre + row + col


def align_loss(model, projected: torch.Tensor, batch: dict) -> torch.Tensor:
    """Projector alignment (the role of LLaVA's stage-1 pretraining): a visual token covering an object
    should point like the sum of the word embeddings of its colour and shape (1 - cosine; background free)."""
    label = batch["patch_label"]
    on_object = label < len(PAIRS)
    if not on_object.any():
        return projected.sum() * 0
    table = model.model.get_input_embeddings().weight.detach()
    ids = batch["pair_word_ids"].to(label.device)  # (P, 2): token ids of the colour and the shape word
    target = table[ids[label[on_object]]].sum(1)
    return (1 - F.cosine_similarity(projected[on_object], target, dim=-1)).mean()


def answer_logits(model, features: torch.Tensor, batch: dict) -> torch.Tensor:
    """Logits predicting every labelled token (answer words and their </s>), flattened in row order.

    `features` are the projected visual tokens (I, N, D), one image per row; rows are left padded."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    embeds = model.model.get_input_embeddings()(input_ids)
    is_image = (input_ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(is_image, features.to(embeds.dtype))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() computes them under left padding
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids)
    predicts = batch["labels"][:, 1:] != -100  # hidden state t predicts token t + 1
    return model.lm_head(hidden.last_hidden_state[:, :-1][predicts])


def vqa_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits, targets[targets != -100])


# --- evaluation -----------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_accuracy(model, processor, n: int = 200) -> float:
    """Greedy first-token accuracy (one teacher-free step) on the first `n` held-out samples."""
    model.eval()
    samples = data.make_scene_qa(n, data.HELDOUT_SEED)
    correct = 0
    for start in range(0, n, 25):
        chunk = samples[start:start + 25]
        texts = [prompt(processor, s["question"]) for s in chunk]
        inputs = processor(images=[s["image"] for s in chunk], text=texts, return_tensors="pt", padding=True)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        words = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        correct += sum(w == s["answer"] for w, s in zip(words, chunk))
    model.train()
    return correct / n


# --- training -------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(cfg: TrainConfig, workdir: Path, out_dir: Path | None, ckpt_every: int = 50,
          eval_every: int = 200, fixed_batch: bool = False, progress: bool = True,
          time_limit: float | None = None) -> list[float]:
    """Run (or resume) both stages; returns the per-step losses of this invocation.

    time_limit (seconds): stop this invocation early (checkpoint and release written) once it is spent.

    fixed_batch=True reuses the first batch of each stage at every step (the smoke test: loss must drop)."""
    torch.manual_seed(cfg.seed)
    processor = build_processor()
    model = build_model(processor.tokenizer, cfg).train()
    heads = AuxHeads(cfg.vision_hidden)
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr_vision, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = workdir / "checkpoint.pt"
    step, log = 0, []
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        architecture = ("seed", "vision_hidden", "vision_layers", "text_hidden", "text_layers", "rope_theta")
        if any(state["config"].get(k) != getattr(cfg, k) for k in architecture):
            raise ValueError(f"{ckpt_path} was written for another model; delete it or pass the same options")
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resumed from {ckpt_path} at step {step}")
    total = cfg.steps_vision + cfg.steps_vqa
    losses: list[float] = []
    bar = tqdm(total=total, initial=step, disable=not progress, dynamic_ncols=True)
    fixed: dict[str, dict] = {}
    cache = None
    started = time.time()
    while step < total and not (time_limit and time.time() - started > time_limit):
        vision_stage = step < cfg.steps_vision
        stage = "vision" if vision_stage else "vqa"
        if vision_stage:
            lr = lr_at(step, cfg.steps_vision, cfg.lr_vision, cfg.warmup)
            n_images, questions = cfg.images_vision, 1
        else:
            lr = lr_at(step - cfg.steps_vision, cfg.steps_vqa, cfg.lr_vqa, cfg.warmup)
            n_images, questions = cfg.images_vqa, cfg.questions_per_image
        for group in optimizer.param_groups:
            group["lr"] = lr
        frozen = cfg.freeze_vision and not vision_stage
        use_cache = frozen and cfg.cache_images > 0 and not fixed_batch
        if use_cache and cache is None:
            cache = load_or_build_cache(model, processor, workdir / "features.pt", cfg.cache_images, progress)
        if fixed_batch:
            batch = fixed.setdefault(stage, make_batch(processor, draw_scenes(0, range(n_images)), questions))
        elif use_cache:
            batch = cached_batch(processor, cache, step, n_images, questions)
        else:
            batch = make_batch(processor, draw_scenes(data.train_seed(step), range(n_images)), questions)
        if use_cache:
            patches, aux = batch["features"], torch.tensor(float("nan"))
        else:
            with torch.set_grad_enabled(not frozen):
                patches, pooled = vision_forward(model, batch["pixel_values"])
                aux = aux_loss(heads, patches, pooled, batch)
        if vision_stage:
            loss, vqa = aux, torch.tensor(float("nan"))
        else:
            projected = model.model.multi_modal_projector(patches)
            logits = answer_logits(model, projected, batch)
            vqa = vqa_loss(logits, batch)
            loss = vqa + cfg.align_weight * align_loss(model, projected, batch)
            if not frozen:
                loss = loss + cfg.aux_weight_vqa * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(stage=stage, aux=f"{aux.item():.3f}", vqa=f"{vqa.item():.3f}", lr=f"{lr:.1e}")
        log.append(f"{step} {stage} aux={aux.item():.4f} vqa={vqa.item():.4f} "
                   f"t={time.time() - started:.0f}s")
        out_of_time = bool(time_limit and time.time() - started > time_limit)
        if step % ckpt_every == 0 or step == total or out_of_time:
            torch.save({"model": model.state_dict(), "heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": step, "config": asdict(cfg)}, ckpt_path)
            with open(workdir / "train_log.txt", "a") as f:
                f.write("\n".join(log) + "\n")
            log = []
        if eval_every and not vision_stage and (step % eval_every == 0 or step == total or out_of_time):
            acc = heldout_accuracy(model, processor)
            bar.write(f"step {step}: held-out first-token accuracy {acc:.1%} (200 samples)")
            with open(workdir / "train_log.txt", "a") as f:
                f.write(f"{step} heldout_acc={acc:.4f}\n")
    bar.close()
    if out_dir is not None:
        save_release(model, processor, out_dir)
    return losses


def save_release(model, processor, out_dir: Path) -> None:
    """Write the fp16 safetensors weights, config, tokenizer and processor files that `load_tiny_vlm` reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().half().save_pretrained(out_dir, safe_serialization=True)
    model.float()
    processor.save_pretrained(out_dir)
    size = (out_dir / "model.safetensors").stat().st_size / 2**20
    print(f"wrote {out_dir} (model.safetensors: {size:.2f} MiB)")


def smoke(steps: int = 6, images: int = 4, progress: bool = False) -> list[float]:
    """`steps` steps of each stage on one small fixed batch of `images` pictures, in a temporary directory.

    Asserts that the loss of each stage goes down; returns the per-step losses."""
    cfg = TrainConfig(steps_vision=steps, steps_vqa=steps, images_vision=images, images_vqa=images, warmup=1,
                      lr_vision=2e-3, lr_vqa=2e-3)
    with tempfile.TemporaryDirectory() as tmp:
        losses = train(cfg, Path(tmp), None, ckpt_every=steps, eval_every=0, fixed_batch=True, progress=progress)
    vision, vqa = losses[:steps], losses[steps:]
    assert vision[-1] < vision[0], f"vision-stage loss did not go down: {vision}"
    assert vqa[-1] < vqa[0], f"VQA-stage loss did not go down: {vqa}"
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few steps on one batch; asserts the loss goes down")
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "tiny_vlm", help="checkpoint and log")
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="where the trained model is written")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--ckpt-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--time-limit", type=float, default=None, help="seconds: stop early, save what there is")
    for name, value in asdict(TrainConfig()).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
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
