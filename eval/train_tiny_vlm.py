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
   the default: no backward pass through the ViT). With the ViT frozen, its features of `--cache-images`
   pictures (training stream `CACHE_SEED`) are computed once and kept in the work directory; every step
   draws fresh questions about 16 cached pictures. Each picture is one row: its prompt prefix (BOS, "USER:",
   the 196 visual tokens) once, then one branch per question (up to `--questions-per-kind` of every kind,
   about 12) under a block-causal 4D mask, positions restarting after the prefix, so that every branch is
   computed exactly as its question alone at inference and one pass over the visual tokens trains a dozen
   answers. Losses: cross-entropy on each answer word and its </s>, averaged per question kind; a
   projector-alignment loss (the role of LLaVA's stage-1 pretraining: the visual tokens of an object point
   like the word embeddings of its colour and shape); and attention supervision (`grounding_loss`): in
   decoder layer `--ground-layer`, one head per kind of question (`GROUND_HEAD`) is trained to put the
   answer position's attention on the patches of the object the question names (on BOS when it is absent;
   spread over the objects' centres for count). Without it the decoder, trained on answers alone, learnt
   to name a colour that is in the picture but rarely the one of the named shape (the binding of shape to
   colour across the visual tokens is what it found hard; 59% held-out after 1,500 steps, 53.8% with the
   previous recipe after 4,400). The decoder's RoPE base is 1e6 (as in Qwen2), so that most rotary
   frequencies barely turn across the prompt: content, not distance, decides what the answer attends to.

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
# the decoder head (of layer `ground_layer`) whose answer attention is supervised, per question kind: one head
# per kind of key (the colour of a named shape, the shape of a named colour, a named pair, all the objects)
GROUND_HEAD = {"colour": 0, "shape": 1, "position": 2, "presence": 2, "count": 3}
CACHE_SEED = 500_000  # the training stream of the VQA stage's feature cache (the vision stage uses 0 .. steps)


@dataclass
class TrainConfig:
    """Hyper-parameters; `steps_*` count optimizer steps."""

    seed: int = 0
    steps_vision: int = 900
    steps_vqa: int = 3600
    images_vision: int = 32
    images_vqa: int = 16
    questions_per_kind: int = 3  # VQA stage: questions of each kind per picture, one branch each (count: 1)
    freeze_vision: bool = True  # VQA stage: the ViT stays as the vision stage left it (a cheaper step)
    lr_vision: float = 2e-3
    lr_vqa: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    aux_weight_vqa: float = 0.3
    align_weight: float = 1.0
    ground_weight: float = 0.3  # attention supervision of the answer position (`grounding_loss`)
    ground_layer: int = 2  # the decoder layer whose heads `GROUND_HEAD` supervises
    cache_images: int = 6000  # frozen-ViT VQA stage: features of this many pictures, computed once (0: fresh)
    vision_hidden: int = 128
    vision_layers: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 8
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
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
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


def draw_scenes(seed: int, indices: range) -> list[dict]:
    """Pictures `indices` of stream `seed`, each with its objects, targets and the rng that asks its questions."""
    scenes = []
    for i in indices:
        rng = np.random.default_rng((seed, i))
        image, objects, mask = data.render_scene(rng)
        scenes.append({"image": image, "objects": objects, "targets": scene_targets(objects, mask), "rng": rng})
    return scenes


def branch_questions(objects: list[dict], rng: np.random.Generator, per_kind: int) -> list[tuple[str, str, str]]:
    """(kind, question, answer) about one picture: up to `per_kind` different questions of every kind (count
    has only one)."""
    asked = []
    for kind in data.KINDS:
        questions: dict[str, str] = {}
        for _ in range(4 * per_kind):  # a few draws; the same question may come up twice
            qa = data.ask(kind, objects, rng)
            if qa is None:
                break
            questions.setdefault(qa[0], qa[1])
            if len(questions) == (1 if kind == "count" else per_kind):
                break
        asked += [(kind, q, a) for q, a in questions.items()]
    return asked


def grounding_target(kind: str, question: str, answer: str, objects: list[dict]) -> tuple[str, str] | str:
    """What the answer should look at: the (colour, shape) pair of the object the question names, "bos" when
    it names an absent one (presence: no), "count" for the count question (every object's centre)."""
    words = question.split()
    if kind == "colour":
        return next((o["colour"], o["shape"]) for o in objects if o["shape"] == words[4])
    if kind == "shape":
        return next((o["colour"], o["shape"]) for o in objects if o["colour"] == words[4])
    if kind == "count":
        return "count"
    if kind == "presence" and answer == "no":
        return "bos"
    return words[3], words[4]  # position, presence (yes): "where is the red circle ?", "is there a red circle ?"


def make_batch(processor, scenes: list[dict], per_kind: int, with_pixels: bool = True) -> dict:
    """One row per picture: its prompt prefix (BOS, "USER:", the visual tokens) once, then one branch per
    question ("{question} ASSISTANT: {answer}</s>") that sees the prefix and itself only (a block-causal 4D
    mask) and whose positions restart where the prefix ends, so that each branch is computed exactly as its
    question alone would be at inference (`prompt`). Questions: `branch_questions` with each scene's rng.

    Returns input_ids, the 4D bool `attention_mask` (True: attend), position_ids, labels (the answer word and
    its </s>), `kinds` (index in data.KINDS of every labelled token), the grounding targets of every question
    (`ground_*`: row, position of the ':' that predicts the answer, supervised head, target weights over the
    row's tokens, whether the target is spread (count) or a set), the stacked scene targets and, if
    `with_pixels`, the pixels."""
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    expand = GRID * GRID * IMAGE_TOKEN
    rows, segments, positions, labels, kinds, grounds = [], [], [], [], [], []
    for r, scene in enumerate(scenes):
        asked = branch_questions(scene["objects"], scene["rng"], per_kind)
        texts = [prompt(processor, q).replace(IMAGE_TOKEN, expand) + f" {a}</s>" for _, q, a in asked]
        encoded = tok(texts, add_special_tokens=True)["input_ids"]
        prefix_len = encoded[0].index(image_id) + GRID * GRID
        ids, segment = list(encoded[0][:prefix_len]), [0] * prefix_len
        position, label, kind_of = list(range(prefix_len)), [-100] * prefix_len, [-1] * prefix_len
        for j, ((kind, question, answer), full) in enumerate(zip(asked, encoded), start=1):
            assert full[:prefix_len] == ids[:prefix_len], "every question shares the prompt prefix"
            branch = full[prefix_len:]
            target = grounding_target(kind, question, answer, scene["objects"])
            grounds.append((r, len(ids) + len(branch) - 3, GROUND_HEAD[kind], target))
            ids += branch
            segment += [j] * len(branch)
            position += range(prefix_len, prefix_len + len(branch))
            label += [-100] * (len(branch) - 2) + branch[-2:]
            kind_of += [data.KINDS.index(kind)] * len(branch)
        rows.append(ids)
        segments.append(segment)
        positions.append(position)
        labels.append(label)
        kinds.append(kind_of)
    length = max(map(len, rows))

    def pad(lists, value):
        return torch.tensor([x + [value] * (length - len(x)) for x in lists])

    segment = pad(segments, -1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_branch = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == 0)
    batch = {"input_ids": pad(rows, tok.pad_token_id), "attention_mask": (causal & same_branch)[:, None],
             "position_ids": pad(positions, 0), "labels": pad(labels, -100), "kinds": pad(kinds, -1),
             "pair_word_ids": torch.tensor([tok.convert_tokens_to_ids(list(p)) for p in PAIRS])}
    for key in scenes[0]["targets"]:
        batch[key] = torch.stack([scene["targets"][key] for scene in scenes])
    batch.update(grounding_weights(batch, grounds, prefix_len))
    if with_pixels:
        batch["pixel_values"] = processor.image_processor([sc["image"] for sc in scenes], return_tensors="pt")[
            "pixel_values"]
    return batch


def grounding_weights(batch: dict, grounds: list[tuple], prefix_len: int) -> dict[str, torch.Tensor]:
    """Target weights over each row's tokens for `grounding_loss`: the patches of the named object, BOS, or
    (count) BOS and every object's centre patch, spread evenly. A question whose object covers no patch
    (hidden behind others) gets no grounding target."""
    first_patch = prefix_len - GRID * GRID
    weights, keep = [], []
    for r, _, _, target in grounds:
        w = torch.zeros(batch["input_ids"].shape[1])
        if target == "count":
            w[first_patch:prefix_len] = batch["centre"][r]
            w[0] = 1
            w /= w.sum()
        elif target == "bos":
            w[0] = 1
        else:
            w[first_patch:prefix_len] = (batch["patch_label"][r] == PAIR_INDEX[target]).float()
        keep.append(bool(w.any()))
        weights.append(w)
    kept = torch.tensor(keep, dtype=torch.bool)
    rows, queries, heads, targets = zip(*grounds)
    return {"ground_row": torch.tensor(rows)[kept], "ground_query": torch.tensor(queries)[kept],
            "ground_head": torch.tensor(heads)[kept], "ground_weights": torch.stack(weights)[kept],
            "ground_spread": torch.tensor([t == "count" for t in targets])[kept]}


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
    return float(sum(p.detach().double().sum() for p in model.model.vision_tower.parameters()))


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


def cached_batch(processor, cache: dict, step: int, n_images: int, per_kind: int) -> dict:
    """Batch `step` of the cached VQA stage: `n_images` cached pictures, fresh questions (seeded by step)."""
    rng = np.random.default_rng((data.train_seed(step), CACHE_SEED))
    picks = rng.choice(len(cache["scenes"]), size=n_images, replace=False)
    scenes = [{**cache["scenes"][i], "rng": np.random.default_rng((data.train_seed(step), int(i)))} for i in picks]
    batch = make_batch(processor, scenes, per_kind, with_pixels=False)
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

    `features` are the projected visual tokens (I, N, D), one image per row (a `make_batch` batch)."""
    input_ids = batch["input_ids"]
    embeds = model.model.get_input_embeddings()(input_ids)
    is_image = (input_ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(is_image, features.to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                        position_ids=batch["position_ids"])
    predicts = batch["labels"][:, 1:] != -100  # hidden state t predicts token t + 1
    return model.lm_head(hidden.last_hidden_state[:, :-1][predicts])


def vqa_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Cross-entropy on the answer tokens, averaged within each question kind, then over kinds (the kinds
    count equally, whatever number of their questions a batch holds)."""
    targets = batch["labels"][:, 1:]
    labelled = targets != -100
    kinds = batch["kinds"][:, 1:][labelled]
    loss = F.cross_entropy(logits, targets[labelled], reduction="none")
    return torch.stack([loss[kinds == k].mean() for k in kinds.unique()]).mean()


class AttentionInputs:
    """A forward pre-hook on one decoder layer's self-attention that keeps what it was called with (hidden
    states, RoPE cos/sin), from which `answer_attention` recomputes the attention of the answer positions."""

    def __init__(self, attention: torch.nn.Module):
        self.attention = attention
        self.handle = attention.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs) -> None:
        self.hidden, self.rope = kwargs["hidden_states"], kwargs["position_embeddings"]

    def remove(self) -> None:
        self.handle.remove()


def answer_attention(inputs: AttentionInputs, batch: dict) -> torch.Tensor:
    """(G, L) log attention probabilities of each grounded question's ':' position (the one that predicts the
    answer) over its row, in the head `GROUND_HEAD` gives its kind: softmax(q . k / sqrt(d)) after RoPE, under
    the batch's mask, as the layer's own attention computes it."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attention, hidden, (cos, sin) = inputs.attention, inputs.hidden, inputs.rope
    rows, query, heads = batch["ground_row"], batch["ground_query"], batch["ground_head"]
    d = attention.head_dim
    q = attention.q_proj(hidden[rows, query]).view(len(rows), -1, d)[torch.arange(len(rows)), heads]
    k = attention.k_proj(hidden).view(*hidden.shape[:2], -1, d)[rows, :, heads // attention.num_key_value_groups]
    q_cos, q_sin = cos[rows, query][:, None], sin[rows, query][:, None]
    q = apply_rotary_pos_emb(q[:, None, None], q[:, None, None], q_cos, q_sin)[0]
    k = apply_rotary_pos_emb(k[:, None], k[:, None], cos[rows], sin[rows])[0]
    scores = (q * k).sum(-1)[:, 0] * attention.scaling  # (G, L)
    allowed = batch["attention_mask"][rows, 0, query]
    return scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)


def grounding_loss(inputs: AttentionInputs, batch: dict) -> torch.Tensor:
    """Attention supervision: -log of the attention mass the answer puts on its target (the named object's
    patches, or BOS when it is absent); for count, the cross-entropy to attention spread evenly over BOS and
    the objects' centres."""
    log_p = answer_attention(inputs, batch)
    weights, spread = batch["ground_weights"], batch["ground_spread"]
    on_target = -log_p.masked_fill(weights == 0, float("-inf")).logsumexp(-1)
    spread_out = -(weights * log_p.masked_fill(weights == 0, 0)).sum(-1)
    return torch.where(spread, spread_out, on_target).mean()


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
        architecture = ("seed", "vision_hidden", "vision_layers", "text_hidden", "text_layers", "text_heads",
                        "rope_theta")
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
    answer_inputs = AttentionInputs(model.model.language_model.layers[cfg.ground_layer].self_attn)
    started = time.time()
    while step < total and not (time_limit and time.time() - started > time_limit):
        vision_stage = step < cfg.steps_vision
        stage = "vision" if vision_stage else "vqa"
        if vision_stage:
            lr = lr_at(step, cfg.steps_vision, cfg.lr_vision, cfg.warmup)
            n_images, questions = cfg.images_vision, 1
        else:
            lr = lr_at(step - cfg.steps_vision, cfg.steps_vqa, cfg.lr_vqa, cfg.warmup)
            n_images, questions = cfg.images_vqa, cfg.questions_per_kind
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
            loss, vqa, ground = aux, torch.tensor(float("nan")), torch.tensor(float("nan"))
        else:
            projected = model.model.multi_modal_projector(patches)
            logits = answer_logits(model, projected, batch)
            vqa, ground = vqa_loss(logits, batch), grounding_loss(answer_inputs, batch)
            loss = vqa + cfg.align_weight * align_loss(model, projected, batch) + cfg.ground_weight * ground
            if not frozen:
                loss = loss + cfg.aux_weight_vqa * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(stage=stage, aux=f"{aux.item():.3f}", vqa=f"{vqa.item():.3f}", ground=f"{ground.item():.3f}",
                        lr=f"{lr:.1e}")
        log.append(f"{step} {stage} aux={aux.item():.4f} vqa={vqa.item():.4f} ground={ground.item():.4f} "
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
    answer_inputs.remove()
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
    parser.add_argument("--eval-every", type=int, default=400)
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
