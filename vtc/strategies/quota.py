"""QuoTA: query-oriented per-frame token budgets for video, assigned before the LLM.

Luo et al., "QuoTA: Query-oriented Token Assignment via CoT Query Decouple for Long Video Comprehension",
arXiv:2503.08689, 2025 (github.com/MAC-AutoML/QuoTA). Per video, a scorer VLM answers for every frame
"Does the image contain any object of {objects}? A. yes, B. no" (or, when the query names no object,
"{query} Does the image contain sufficient information to answer the given question? A. yes, B. no"), both
followed by "Answer with the option's letter directly."; p_i is the probability of the answer token "A"
(softmax of the last prompt token's logits over the *whole vocabulary*, as `tools/qwen2vl_batch.py`:
`softmax(logits[:, -1], -1)[:, id("A")]`). Weights w_i = (100 p_i)^2 normalised over the video's frames;
frame i gets n_i = int(total * w_i) tokens, `total` being the video's budget; frames with n_i = 0 are dropped.
The default reduction is the official "v1": the frame's token grid is resized bilinearly
(`F.interpolate(..., mode="bilinear")`) to th x tw with th = tw = int(sqrt(n_i)), then one side grown by one
if that still fits in n_i (so th * tw <= n_i tokens are realised). "v2" (adaptive average pooling to the same
grid) is `reduction="pool"`, "v4" (ToMe bipartite merging to exactly n_i tokens) is `reduction="tome"`.

Our choices (the official code patches LLaVA-Video's `prepare_inputs_labels_for_multimodal`):

- Budget: `keep` gives every frame (unit) its usual budget b; a video's total is b x its frames (the official
  "enhance_tokens x enhance_total"). A frame never gets more tokens than it has: weights above n / total are
  capped and the excess is given to the uncapped frames in proportion to their weights, repeated until none
  exceeds the cap (the official `scale_weights`, used by its v2-v5, redistributes once; v1 upsamples instead,
  which would need positions that do not exist).
- Non-square grids (Qwen2-VL frames): th = int(sqrt(n_i rows / cols)), tw = int(sqrt(n_i cols / rows)) (the
  official formula for square grids), clamped to the grid and to th * tw <= n_i, then the same one-side growth.
- Positions: a resized token sits at the original position (M-RoPE t/h/w included) of the source token
  nearest its cell centre (row floor((i + 0.5) rows / th), likewise columns), so kept tokens stay in raster
  order; ToMe keeps each merged token at its surviving representative. The official code re-numbers the
  shorter sequence instead.
- Scorer: by default the patched model itself, scoring each frame as a one-frame *video* prompt built with
  the processor's chat template; the frame's projected features, already computed for the prompt, are reused
  (no second vision pass): for OneVision the frame's pooled features + the video's newline token, for
  Qwen2-VL / Qwen2.5-VL one temporal patch with M-RoPE ids as `get_rope_index` gives a (1, h, w) video. This
  equals running the unpatched model on that one-frame prompt (tested). The scoring forwards call the language
  model class's own forward on the instance (`type(lm).forward(lm, ...)`), which bypasses vtc's instance
  forward and hooks, so they never recurse into the pruning. The paper's separate scorer (Qwen2-VL-2B): pass
  `scorer_model=` and `scorer_processor=`; each frame, rebuilt from the pixels the model saw (normalisation
  undone; for Qwen2-VL the first frame of each temporal patch), is asked as one *image* prompt, as the
  official `tools/qwen2vl_batch.py`. `scorer=` takes any callable (features (F, N, D), grid, prompt) -> p.
- CLIP scorer (`scorer="clip"`, a deviation from the paper, which asks a VLM): an open_clip model scores each
  frame by the cosine similarity of its image embedding and the text embedding of the question (the objects,
  comma-joined, when `objects=` or CoT gives them, else the query), clamped at 0 (a negative similarity counts as
  no evidence, as p = 0); that score replaces p_i and the allocation w_i = (100 p_i)^2 is unchanged. One image
  encoder pass per frame instead of a VLM prefill per frame. The model comes as `clip_model=` + `clip_tokenizer=`
  (+ optional `clip_preprocess=`, else open_clip's eval transform from the model's own image size, mean and std),
  or `clip_name=` (+ `clip_pretrained=`: a tag of the user's open_clip cache or a local checkpoint file; required
  unless the name is an "hf-hub:" one, so that no random-weight CLIP scores silently), loaded with open_clip's
  `create_model_and_transforms` (which downloads what is not cached; HF_HUB_OFFLINE=1 forbids it).
  `last_prompts` holds CLIP's text. The frames it sees are those the VLM saw: rebuilt from the
  processor's pixel values (`frame_images`, as the separate scorer VLM), then CLIP's preprocessing; the raw
  decoded frames never reach the strategy. open_clip (the `clip` extra, which needs torchvision) is imported
  only on this path.
- Query: `query=` if given, else the text tokens after the sample's last visual token (all its text tokens
  when none follow), decoded with the processor's tokenizer (special tokens skipped) minus the chat template's
  generation tail; their ids are read back exactly from the embeddings (each text embedding is one row of the
  embedding table). `objects=` gives the object list directly.
- Families: frames are scored on LLaVA-OneVision and Qwen2-VL / Qwen2.5-VL video; another family's video
  fails at its first forward naming `scorer=` (a callable (features (F, N, D), grid, prompt) -> p per frame).
- Selections are made once per prefill; with `handle.reuse_selection` (generate(use_cache=False) recomputing
  from the same selection) nothing is re-scored, and the note still counts the last scoring.
- CoT query decoupling (`cot=True`, off by default: one greedy generation of up to `cot_max_new_tokens` per
  video before scoring): the patched model's own LM (as the official code, which asks LLaVA-Video itself,
  text only) answers the official three-step prompt, its three in-context examples left out to keep the
  generation short (`cot_prompt=` takes another, with a "{query}" field); "Step 3: [...]" is read with
  `ast.literal_eval` (never `eval`) when "Step 1: yes", else no objects (the query form of the question).
- Images (and LLaVA-NeXT crops) are single frames: weight 1, no scoring pass, reduced to their budget by the
  same reduction (so on images QuoTA is a bilinear-resize baseline). keep=1.0 keeps everything unscored.
- `handle.report()` notes the scorer (the model itself, a scorer VLM, clip, a callable) and its scoring passes
  (frames scored, scorer forwards, seconds) of each prefill;
  `strategy.last_plan` lists per unit p, weight, budget n_i and realised grid.
"""

from __future__ import annotations

import ast
import math
import re
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..local import PerThread
from .base import Strategy, VisualTokens, register_strategy
from .tome import merge_to_budget
from .video_groups import video_of as _video_of

OBJECT_PROMPT = (
    "Does the image contain any object of {objects}? A. yes, B. no\nAnswer with the option's letter directly."
)
QUERY_PROMPT = (
    "{query}\nDoes the image contain sufficient information to answer the given question? A. yes, B. no\n"
    "Answer with the option's letter directly."
)
COT_PROMPT = """{query}
To answer this question, please follow the following step to give an object list for object detection.
    Step 1: Do you think it is necessary to detect specific physical entities in the video? Please only answer "yes" or "no" in this step.
    Step 2: If 'yes' in previous step, then what object in the video do you think needs to be detected to answer this question? Please only output the name of all the objects need to detect in the form of a Python list without other information.
    Step 3: Filter the object list provided in step 2, make sure they are physical entities, not abstract concepts. Please only output the name of the filtered object in the form of a Python list without other information. If all the words being filtered, please only output null."""  # noqa: E501  (the paper's prompt, its in-context examples left out)
REDUCTIONS = ("bilinear", "pool", "tome")
CLIP_HINT = "pip install 'vtc-vlm[clip]' (open_clip_torch, which needs torchvision; `make clip-setup` in a checkout)"
_MARK = "QUOTAQUERYMARK"


def frame_weights(probs, scale: float = 100.0, power: float = 2.0) -> torch.Tensor:
    """w_i = (scale p_i)^power normalised to sum 1 (float64); uniform when every weight is 0."""
    w = (torch.as_tensor(probs, dtype=torch.float64) * scale) ** power
    return w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(w))


def cap_weights(weights: torch.Tensor, cap: float) -> torch.Tensor:
    """Weights (summing to 1) with none above `cap`: the excess goes to the uncapped ones, in proportion, repeatedly."""
    w = weights.clone().double()
    capped = torch.zeros_like(w, dtype=torch.bool)
    for _ in range(len(w)):
        over = w > cap
        if not bool(over.any()):
            break
        excess = float((w[over] - cap).sum())
        w[over] = cap
        capped |= over
        free = ~capped & (w > 0)
        if not bool(free.any()):
            break
        w[free] += excess * w[free] / w[free].sum()
    return w


def frame_budgets(probs, total: int, cap: int, scale: float = 100.0, power: float = 2.0) -> list[int]:
    """n_i = int(total w_i) per frame (w from `frame_weights`, capped at cap / total tokens); 0 drops the frame."""
    w = cap_weights(frame_weights(probs, scale, power), cap / total) if total > 0 else frame_weights(probs)
    return [min(cap, int(total * float(x) + 1e-9)) for x in w]


def target_grid(n: int, rows: int, cols: int) -> tuple[int, int]:
    """(th, tw), th * tw <= n, of the resized frame (the official v1 formula, generalised to rows != cols)."""
    n = min(n, rows * cols)
    if n <= 0:
        return 0, 0
    if n == rows * cols:
        return rows, cols
    th = max(1, min(rows, int(math.sqrt(n * rows / cols) + 1e-9)))
    tw = max(1, min(cols, int(math.sqrt(n * cols / rows) + 1e-9), n // th))
    if th * tw < n:
        if th + 1 <= rows and (th + 1) * tw <= n:
            th += 1
        elif tw + 1 <= cols and th * (tw + 1) <= n:
            tw += 1
    return th, tw


def cell_representatives(th: int, tw: int, rows: int, cols: int) -> torch.Tensor:
    """(th * tw,) raster indices of the source tokens nearest each cell centre, ascending."""
    r = torch.floor((torch.arange(th) + 0.5) * rows / th).long()
    c = torch.floor((torch.arange(tw) + 0.5) * cols / tw).long()
    return (r[:, None] * cols + c[None, :]).reshape(-1)


def reduce_frame(
    features: torch.Tensor, grid: tuple[int, int], n: int, reduction: str = "bilinear"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One frame's (N, D) features reduced to at most n tokens: (sorted source indices, their new features)."""
    rows, cols = grid
    device = features.device
    if n >= rows * cols:
        return torch.arange(rows * cols, device=device), features
    if n <= 0:
        return torch.empty(0, dtype=torch.long, device=device), features[:0]
    if reduction == "tome":
        index, merged, _ = merge_to_budget(features[None], features[None], n)
        return index[0], merged[0]
    th, tw = target_grid(n, rows, cols)
    x = features.float().T.reshape(1, -1, rows, cols)
    if reduction == "bilinear":
        y = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)
    else:
        y = F.adaptive_avg_pool2d(x, (th, tw))
    merged = y.reshape(-1, th * tw).T.to(features.dtype)
    return cell_representatives(th, tw, rows, cols).to(device), merged


def parse_cot_objects(text: str) -> list[str]:
    """Objects from the CoT answer: the list after "Step 3:" when "Step 1: yes", else none."""
    low = text.lower()
    step1 = re.search(r"step 1:\s*(yes|no)", low)
    step3 = re.search(r"step 3:\s*(\[[^\]]*\])", low)
    if not step1 or step1.group(1) != "yes" or not step3:
        return []
    try:
        value = ast.literal_eval(step3.group(1))
    except (ValueError, SyntaxError):
        return []
    return [str(v) for v in value if str(v).strip()] if isinstance(value, (list, tuple)) else []


@register_strategy
class QuoTA(Strategy):
    name = "quota"
    aliases = ("quo_ta",)
    stage = "pre_llm"
    paper = "Luo et al., QuoTA, arXiv:2503.08689, 2025"
    default_keep = 0.25
    # this thread's last prefill
    last_plan = PerThread([])
    last_prompts = PerThread({})
    _layout = PerThread(None)

    def __init__(
        self,
        keep: float | int = 0.25,
        processor=None,
        query: str | None = None,
        objects: list[str] | None = None,
        cot: bool = False,
        cot_max_new_tokens: int = 128,
        cot_prompt: str = COT_PROMPT,
        reduction: str = "bilinear",
        weight_scale: tuple[float, float] = (100.0, 2.0),
        answer_token: str | int = "A",
        score_batch: int = 32,
        scorer: Callable | str | None = None,
        scorer_model: torch.nn.Module | None = None,
        scorer_processor=None,
        clip_model: torch.nn.Module | None = None,
        clip_tokenizer: Callable | None = None,
        clip_preprocess: Callable | None = None,
        clip_name: str | None = None,
        clip_pretrained: str | None = None,
    ):
        super().__init__(keep)
        clip_args = dict(
            clip_model=clip_model,
            clip_tokenizer=clip_tokenizer,
            clip_preprocess=clip_preprocess,
            clip_name=clip_name,
            clip_pretrained=clip_pretrained,
        )
        given = [k for k, v in clip_args.items() if v is not None]
        if isinstance(scorer, str) and scorer != "clip":
            raise ValueError(f"scorer= takes 'clip' or a callable (features, grid, prompt) -> p, got {scorer!r}")
        if scorer != "clip" and given:
            raise ValueError(f"{', '.join(given)} only apply with scorer='clip'")
        if scorer == "clip":
            if scorer_model is not None:
                raise ValueError("scorer='clip' and scorer_model= are two different frame scorers: pass one")
            if (clip_model is None) == (clip_name is None):
                raise ValueError(
                    "scorer='clip' needs clip_model= and clip_tokenizer= (open_clip objects) or clip_name= (an "
                    "open_clip model name, with clip_pretrained= a cached tag or a checkpoint file), not both"
                )
            if clip_model is not None and clip_tokenizer is None:
                raise ValueError("scorer='clip' with clip_model= needs its clip_tokenizer= (open_clip.get_tokenizer)")
            if clip_name is not None and (clip_tokenizer is not None or clip_preprocess is not None):
                raise ValueError(
                    "clip_name= loads the tokenizer and preprocessing itself: drop clip_tokenizer=/"
                    "clip_preprocess=, or pass clip_model= instead of clip_name="
                )
            if clip_name is not None and clip_pretrained is None and not clip_name.startswith("hf-hub:"):
                raise ValueError(
                    f"clip_name={clip_name!r} without clip_pretrained= would build it with random weights: pass "
                    "the pretrained tag you have cached (e.g. 'openai') or a checkpoint file, or an 'hf-hub:' name"
                )
            if processor is None:
                raise ValueError(
                    "scorer='clip' needs the model's processor (processor=) to rebuild the frames the model saw"
                )
            open_clip = import_open_clip()
            if clip_name is not None:
                clip_model, _, clip_preprocess = open_clip.create_model_and_transforms(
                    clip_name, pretrained=clip_pretrained
                )
                clip_model, clip_tokenizer = clip_model.eval(), open_clip.get_tokenizer(clip_name)
            elif clip_preprocess is None:
                visual = clip_model.visual
                clip_preprocess = open_clip.image_transform(
                    visual.image_size,
                    is_train=False,
                    mean=getattr(visual, "image_mean", None),
                    std=getattr(visual, "image_std", None),
                )
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"reduction must be one of {', '.join(REDUCTIONS)} (official v1, v2, v4), got {reduction!r}"
            )
        if processor is None and scorer is None:
            raise ValueError(
                "strategy 'quota' needs the model's processor to build its per-frame scoring prompts (and to read "
                "the query from the prompt): vtc.patch(model, 'quota', processor=processor, keep=0.25)"
            )
        if (scorer_model is None) != (scorer_processor is None):
            raise ValueError("a separate scorer VLM needs both scorer_model= and scorer_processor=")
        if processor is None and query is None and objects is None:
            raise ValueError("strategy 'quota' without a processor needs query= or objects= (the frame question)")
        self.processor = processor
        self.query, self.objects = query, list(objects) if objects is not None else None
        self.cot, self.cot_max_new_tokens, self.cot_prompt = cot, cot_max_new_tokens, cot_prompt
        self.reduction, self.weight_scale = reduction, weight_scale
        self.answer_token, self.score_batch, self.scorer = answer_token, score_batch, scorer
        self.scorer_model, self.scorer_processor = scorer_model, scorer_processor
        self.clip_model, self.clip_tokenizer, self.clip_preprocess = clip_model, clip_tokenizer, clip_preprocess
        self.clip_name = clip_name
        self.notes: list[str] = []
        self.last_plan: list[dict] = []
        self.last_prompts: dict[tuple, str] = {}  # video -> the frame question asked in the last prefill
        self._layout = None
        self._stats = {"frames": 0, "forwards": 0, "seconds": 0.0, "cot": 0}

    def check_adapter(self, adapter) -> None:
        """Refuse at patch() a video model whose frames this strategy cannot score with the model itself."""
        name = type(adapter.model).__name__
        if self.scorer is None and self.scorer_model is None and name.startswith("Qwen3VL"):
            raise ValueError(
                f"quota scores video frames with the model itself on LLaVA-OneVision and Qwen2-VL/Qwen2.5-VL, not "
                f"{name} (its DeepStack features would be missing from the one-frame prompts): pass "
                "scorer_model=/scorer_processor= (another VLM) or scorer=callable(features, grid, prompt)"
            )

    def describe(self) -> str:
        scorer = ", scorer=clip" if self.scorer == "clip" else ""
        return f"quota(keep={self.keep}, reduction={self.reduction}{scorer}{', cot' if self.cot else ''})"

    # --- selection ---------------------------------------------------------------------------------
    def select(self, visual: VisualTokens):
        n, k = visual.num_tokens, visual.budget
        device = visual.features.device
        layout = visual.context["layout"]
        if layout is not self._layout:  # a new prefill: start its record
            self._layout, self.last_plan, self.last_prompts = layout, [], {}
            self._stats = {"frames": 0, "forwards": 0, "seconds": 0.0, "cot": 0}
            self.notes = ["quota: nothing scored (every frame/image keeps all its tokens)"]
        if k >= n:
            return torch.arange(n, device=device).expand(visual.num_images, -1)
        units = [int(u) for u in visual.image_index.tolist()]
        groups: dict[tuple, list[int]] = {}
        for row, unit in enumerate(units):
            groups.setdefault(_video_of(layout, unit), []).append(row)
        keep = torch.zeros(visual.num_images, n, dtype=torch.bool, device=device)
        merged = visual.features.clone()
        for key, rows in groups.items():
            probs = [1.0] * len(rows)
            if len(rows) > 1:
                sample = layout.sample_of_image[units[rows[0]]]
                probs = self._score(visual, rows, sample, key).tolist()
            budgets = frame_budgets(probs, k * len(rows), n, *self.weight_scale)
            weights = frame_weights(probs, *self.weight_scale).tolist()
            for row, p, w, budget in zip(rows, probs, weights, budgets):
                index, values = reduce_frame(visual.features[row], visual.grid, budget, self.reduction)
                keep[row, index] = True
                merged[row, index] = values.to(merged.dtype)
                self.last_plan.append(
                    dict(
                        unit=units[row],
                        video=key,
                        p=p,
                        weight=w,
                        budget=budget,
                        kept=len(index),
                        grid=target_grid(budget, *visual.grid) if self.reduction != "tome" else None,
                    )
                )
        s = self._stats
        self.notes = [
            f"quota ({self.scorer_name()}): {s['frames']} frame scoring passes in {s['forwards']} scorer forwards "
            f"(+{s['cot']} CoT generations) took {s['seconds']:.3f} s before the prefill; "
            f"{sum(p['budget'] == 0 for p in self.last_plan)} of {len(self.last_plan)} frames/images dropped"
        ]
        return keep, merged

    # --- scoring -----------------------------------------------------------------------------------
    def _score(self, visual: VisualTokens, rows: list[int], sample: int, key: tuple) -> torch.Tensor:
        """p("A") of each frame of one video (rows of `visual`)."""
        device = visual.features.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        objects = self.objects
        query = self.query
        model = visual.context.get("model")
        if objects is None and (query is None or self.cot):
            query = query if query is not None else self._query_from_prompt(visual, sample)
            if self.cot:
                objects = parse_cot_objects(
                    self._generate(model, visual.context["lm"], self.cot_prompt.format(query=query))
                )
                self._stats["cot"] += 1
        prompt = OBJECT_PROMPT.format(objects=", ".join(objects)) if objects else QUERY_PROMPT.format(query=query)
        if self.scorer == "clip":  # CLIP's text: the objects or the question itself, not the yes/no prompt
            prompt = ", ".join(objects) if objects else query
        self.last_prompts[key] = prompt
        features = visual.features[rows]
        if self.scorer == "clip":
            images = frame_images(
                model, self.processor, visual.context["layout"], [int(visual.image_index[r]) for r in rows]
            )
            probs = self.clip_scores(images, prompt).clamp(min=0).double()
            self._stats["forwards"] += -(-len(rows) // self.score_batch)
        elif self.scorer is not None:
            probs = torch.as_tensor(self.scorer(features, visual.grid, prompt), dtype=torch.float64).flatten()
            self._stats["forwards"] += 1
        elif self.scorer_model is not None and self.scorer_model is not model:
            images = frame_images(
                model, self.processor, visual.context["layout"], [int(visual.image_index[r]) for r in rows]
            )
            probs = torch.cat(
                [
                    self.scorer_probabilities(images[i : i + self.score_batch], prompt)
                    for i in range(0, len(rows), self.score_batch)
                ]
            ).double()
            self._stats["forwards"] += -(-len(rows) // self.score_batch)
        else:
            probs = torch.cat(
                [
                    self.frame_probabilities(model, features[i : i + self.score_batch], visual.grid, prompt)
                    for i in range(0, len(rows), self.score_batch)
                ]
            ).double()
            self._stats["forwards"] += -(-len(rows) // self.score_batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self._stats["frames"] += len(rows)
        self._stats["seconds"] += time.perf_counter() - start
        return probs.cpu()

    @property
    def last_scoring(self) -> dict:
        """The last prefill's scoring: frames scored, scorer forwards, CoT generations, seconds, and the scorer."""
        return dict(self._stats, scorer=self.scorer_name())

    def scorer_name(self) -> str:
        """Which scorer the notes name: "clip <architecture>", "scorer VLM <class>", "callable" or "the model"."""
        if self.scorer == "clip":
            return f"clip {self.clip_name or type(self.clip_model).__name__}"
        if self.scorer is not None:
            return "callable scorer"
        if self.scorer_model is not None:
            return f"scorer VLM {type(self.scorer_model).__name__}"
        return "the model itself"

    @torch.no_grad()
    def clip_scores(self, images: list, text: str) -> torch.Tensor:
        """Cosine similarity of each image's CLIP embedding with the text's (float32, on the CPU; unclamped)."""
        model = self.clip_model
        weight = next(model.parameters())
        tokens = self.clip_tokenizer([text]).to(weight.device)
        text_embedding = F.normalize(model.encode_text(tokens).float(), dim=-1)
        out = []
        for i in range(0, len(images), self.score_batch):
            pixels = torch.stack([self.clip_preprocess(im) for im in images[i : i + self.score_batch]])
            image_embedding = F.normalize(model.encode_image(pixels.to(weight.device, weight.dtype)).float(), dim=-1)
            out.append((image_embedding @ text_embedding.T)[:, 0])
        return torch.cat(out).cpu()

    def answer_id(self, tokenizer=None) -> int:
        """Vocabulary id of the answer "A" (Qwen2: 32, the official `a_token_id`)."""
        if isinstance(self.answer_token, int):
            return self.answer_token
        tokenizer = tokenizer if tokenizer is not None else self.processor.tokenizer
        return tokenizer.encode(self.answer_token, add_special_tokens=False)[-1]

    def _render(self, text: str, video: bool, processor=None, image: bool = False) -> str:
        """The processor's chat prompt (generation prompt added) for `text`, after one video (or image)."""
        proc = processor if processor is not None else self.processor
        kind = "video" if video else "image" if image else None
        if getattr(proc, "chat_template", None) and hasattr(proc, "apply_chat_template"):
            content = ([{"type": kind}] if kind else []) + [{"type": "text", "text": text}]
            return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        if hasattr(proc, "prompt"):  # vtc.testing.qwen2_vl's offline processor
            return proc.prompt(text, int(image), int(video))
        raise ValueError("quota needs a processor with a chat template (apply_chat_template) to build its prompts")

    @torch.no_grad()
    def scorer_probabilities(self, images: list, prompt: str) -> torch.Tensor:
        """p("A") per frame from the separate scorer VLM: one image prompt per frame, as the official
        `tools/qwen2vl_batch.py` (softmax over the whole vocabulary at the last prompt token)."""
        proc, scorer = self.scorer_processor, self.scorer_model
        text = self._render(prompt, video=False, processor=proc, image=True)
        inputs = proc(text=[text] * len(images), images=images, padding=True, return_tensors="pt")
        device = next(scorer.parameters()).device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in dict(inputs).items()}
        logits = scorer(**inputs).logits[:, -1]
        return logits.float().softmax(-1)[:, self.answer_id(proc.tokenizer)]

    @torch.no_grad()
    def frame_probabilities(self, model, features: torch.Tensor, grid: tuple[int, int], prompt: str) -> torch.Tensor:
        """p("A") per frame: the unpatched model on a one-frame video prompt asking `prompt` about each frame
        (features: (F, N, D) the frames' projected tokens). Softmax over the whole vocabulary."""
        lm = model.model.language_model
        embeds, positions = self._frame_prompt(model, features, grid, prompt)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        out = type(lm).forward(lm, inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=False)
        logits = model.lm_head(out.last_hidden_state[:, -1])
        return logits.float().softmax(-1)[:, self.answer_id()]

    def _frame_prompt(self, model, features, grid, prompt):
        """(inputs_embeds (F, L, D), position ids) of the one-frame video prompt, with the frames' features in."""
        config = model.config
        ids = self.processor.tokenizer(self._render(prompt, video=True))["input_ids"]
        where = [i for i, t in enumerate(ids) if t == config.video_token_id]
        if len(where) != 1:
            raise ValueError("the rendered scoring prompt must hold exactly one video placeholder")
        embed = model.model.get_input_embeddings()
        prefix, suffix = (
            embed(torch.tensor(part, device=features.device)) for part in (ids[: where[0]], ids[where[0] + 1 :])
        )
        frames, p = features.shape[0], len(prefix)
        name = type(model).__name__
        if name.startswith("LlavaOnevision"):
            newline = model.model.image_newline.to(features.dtype)[None, None].expand(frames, 1, -1)
            vision = torch.cat([features, newline], dim=1)
            length = p + vision.shape[1] + len(suffix)
            positions = torch.arange(length, device=features.device).expand(frames, -1)
        elif name.startswith("Qwen2"):
            rows, cols = grid
            vision = features
            r = torch.arange(rows, device=features.device).repeat_interleave(cols)
            c = torch.arange(cols, device=features.device).repeat(rows)
            text = torch.arange(p, device=features.device)
            after = p + max(rows, cols) + torch.arange(len(suffix), device=features.device)
            t_ids = torch.cat([text, torch.full_like(r, p), after])
            positions = torch.stack([t_ids, torch.cat([text, p + r, after]), torch.cat([text, p + c, after])])
            positions = positions[:, None].expand(-1, frames, -1)
        else:
            raise NotImplementedError(
                f"quota scores video frames with the model itself on LLaVA-OneVision and Qwen2-VL/Qwen2.5-VL, not "
                f"{name}: pass scorer=callable(features, grid, prompt) -> probability per frame"
            )
        embeds = torch.cat(
            [prefix[None].expand(frames, -1, -1), vision.to(prefix.dtype), suffix[None].expand(frames, -1, -1)], 1
        )
        return embeds, positions

    @torch.no_grad()
    def _generate(self, model, lm, text: str) -> str:
        """Greedy text-only generation with the unpatched language model (the CoT query decoupling)."""
        from transformers import DynamicCache

        tok = self.processor.tokenizer
        ids = torch.tensor([tok(self._render(text, video=False))["input_ids"]], device=model.lm_head.weight.device)
        cache, out, step = DynamicCache(config=lm.config), [], ids
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
        length = 0
        for _ in range(self.cot_max_new_tokens):
            positions = torch.arange(length, length + step.shape[1], device=ids.device)[None]
            if type(model).__name__.startswith("Qwen2"):
                positions = positions[None].expand(3, -1, -1)
            hidden = (
                type(lm)
                .forward(lm, input_ids=step, position_ids=positions, past_key_values=cache, use_cache=True)
                .last_hidden_state
            )
            length += step.shape[1]
            step = model.lm_head(hidden[:, -1]).argmax(-1, keepdim=True)
            if int(step) in eos:
                break
            out.append(int(step))
        return tok.decode(out, skip_special_tokens=True)

    def _query_from_prompt(self, visual: VisualTokens, sample: int) -> str:
        """The sample's text after its last visual token (all its text when none follows), minus the chat
        template's generation tail."""
        seq, lm = visual.context["sequence"], visual.context["lm"]
        after = int(visual.context["rows"][visual.context["sample"] == sample].max()) % seq.hidden.shape[1] + 1
        text = self._decode_rows(lm, seq.hidden[sample, after:][seq.valid[sample, after:]])
        if not text:
            text = self._decode_rows(lm, seq.hidden[sample][seq.valid[sample] & (seq.vis_index[sample] < 0)])
        if not text:
            raise ValueError("quota found no question in the prompt: pass query= (or objects=)")
        return text

    def _decode_rows(self, lm, rows: torch.Tensor) -> str:
        """Token ids read back from text embeddings (nearest row of the embedding table, kept when equal:
        rows that are no vocabulary embedding, e.g. a video's newline feature, drop), decoded without special
        tokens and without the chat template's generation tail."""
        table = lm.get_input_embeddings().weight
        if len(rows) == 0:
            return ""
        best = torch.zeros(len(rows), dtype=torch.long, device=rows.device)
        best_distance = torch.full((len(rows),), float("inf"), device=rows.device)
        for start in range(0, table.shape[0], 16384):  # chunks of the vocabulary: no full-table float copy
            chunk = table[start : start + 16384].float()
            distance = (chunk * chunk).sum(-1)[None] - 2 * rows.float() @ chunk.T
            value, index = distance.min(-1)
            better = value < best_distance
            best[better], best_distance[better] = index[better] + start, value[better]
        ids = best[(table[best] == rows).all(-1)].tolist()
        tok = self.processor.tokenizer
        text = tok.decode(ids, skip_special_tokens=True).strip()
        tail = self._render(_MARK, video=False).split(_MARK, 1)[1]
        tail = tok.decode(tok(tail, add_special_tokens=False)["input_ids"], skip_special_tokens=True).strip()
        if tail and text.endswith(tail):
            text = text[: -len(tail)].strip()
        return text


def frame_images(model, processor, layout, units: list[int]) -> list:
    """The frames of video units as PIL images, rebuilt from the pixels the model saw (the main processor's
    normalisation undone): OneVision's resized frames; for Qwen2-VL / Qwen2.5-VL the first frame of each
    temporal patch (a unit is 2 frames), un-patchified from the processor's (t, h/m, w/m, m, m) patch order."""
    from PIL import Image

    ip = processor.image_processor
    mean, std = torch.tensor(ip.image_mean)[:, None, None], torch.tensor(ip.image_std)[:, None, None]
    infos = layout.extras["units"]
    out = []
    for unit in units:
        info = infos[unit]
        if info.get("role") == "frame":
            pixels = layout.extras["videos"][info["video"]]["pixels"][info["frame"]]
        else:
            patches, grids = layout.extras["video_pixels"]
            vision = model.config.vision_config
            size, temporal, m = vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size
            t, gh, gw = grids[info["index"]].tolist()
            start = int(sum(int(g.prod()) for g in grids[: info["index"]]))
            x = patches[start : start + t * gh * gw].view(t, gh // m, gw // m, m, m, -1, temporal, size, size)
            x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t, temporal, -1, gh * size, gw * size)
            pixels = x[info["t"], 0]
        image = (pixels.detach().float().cpu() * std + mean).clamp(0, 1)
        out.append(Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()))
    return out


def import_open_clip():
    """open_clip, imported on first use (the `clip` extra), or an ImportError naming the extra."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(f"quota's scorer='clip' needs open_clip: {CLIP_HINT}") from error
    return open_clip

