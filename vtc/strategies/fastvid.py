"""FastVID: dynamic temporal segmentation, then density-based spatio-temporal pruning with anchor-frame merging.

Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models", NeurIPS 2025
(openreview.net/forum?id=2xS4VtpApy; github.com/LunarShen/FastVID, read at commit a40a109: the LLaVA-OneVision
version, `fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py`, the block "FastVID" in
`Qwen2Model.forward`, which prunes the video's tokens once before the first decoder layer). Defaults are the
official scripts' (`scripts/eval.sh`): retention 0.10, DySeg c = 8, tau = 0.9, STPrune d = 0.4, DTM p = 4,
beta = 0.6. Per video of T frames of n tokens (x: the projected tokens entering the LLM):

- DySeg: g_t = the frame's global feature, L2-normalised; s_t = g_t . g_{t+1}; a segment ends after frame t when t is
  among the c - 1 smallest s or s_t < tau.
- budgets: R = tokens per frame, salient S = R - int(R d), context C = R - S. In a segment of L frames the anchor
  frames are the last one and every p-th before it ((L - 1 - j) % p == 0); each gets C L // ceil(L / p) context
  tokens, the other frames none.
- ATS (salient tokens): per frame, the S tokens with the highest attention score, kept as they are.
- density score of each remaining token of a frame (DPC-kNN): d = cdist / sqrt(D), rho = exp(-mean of the squared
  distances to its 4 nearest tokens, itself included), delta = distance to the nearest token of higher rho (the
  frame's largest distance when none), score = delta rho.
- DTM: a frame whose context count equals C (every frame of a one-frame segment) takes its C highest-score remaining
  tokens as targets, and every remaining token of the frame joins the target of highest cosine similarity; in a
  longer segment each anchor frame takes its own highest-score targets (as many as the segment's last frame gets)
  and EVERY remaining token of the whole segment joins its most similar target of that anchor frame (so a token
  is merged into each anchor frame of its segment). A target becomes w target + (1 - w) mean(its members, itself
  included), w = max(1 / (members + 1), beta).

Kept tokens (salient and targets) stay in order at their original positions (the official code passes the kept
tokens' own indices as position ids; Qwen-VL: their (t, h, w) ids); a merged token sits at its target's place.

Scores in vtc (the official code reads them from the vision tower's SigLIP attention-pooling head on LLaVA-OneVision,
which vtc's adapters do not expose; its Qwen2.5-VL version uses the last vision block's attention of the frame's mean
query to each merged token, and the frame's mean merged token as g):
- attention score: the adapter's "received" probe at the feature layer (the attention each token receives, averaged
  over the frame's patch queries, mean over heads; Qwen-VL: the last vision block, as the official Qwen2.5-VL code);
- frame global feature g: the mean of the frame's projected tokens (the official Qwen2.5-VL rule) on every family.

Other deviations: R is vtc's per-frame budget (round(n keep); official int(n r)); the official density gets uniform
noise * 1e-6 to break ties, ours breaks them by index (a tied token counts as denser than the later ones), so the
selection is deterministic; c - 1 is capped at the T - 1 gaps (official: an error with fewer than c frames); an anchor
frame takes at most its remaining tokens as targets (official: an error); the Qwen2.5-VL version's two-level
segmentation (`DySeg_ignore`) and its other budget split are not reproduced: one algorithm for every family, the
OneVision one. An image (or crop) is a one-frame video (a one-frame segment), where the official code prunes videos
only. InternVL receives videos as pictures: `frames="sample"` takes a sample's pictures as one video's frames.
Computed in float32, batched over the frames of a video (DPC-kNN, targets, merging); the loop is over segments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..local import PerThread
from .base import Strategy, VisualTokens, register_strategy
from .video_groups import FRAMES, video_rows

NEIGHBOURS = 4


def segment_sizes(global_features: torch.Tensor, c: int, tau: float) -> list[int]:
    """DySeg: frames per segment from the (T, D) frame global features."""
    frames = global_features.shape[0]
    if frames <= 1:
        return [frames]
    g = F.normalize(global_features.float(), dim=-1)
    similarity = (g[:-1] * g[1:]).sum(dim=-1)
    lowest = torch.sort(similarity, stable=True).indices[: max(0, min(c - 1, frames - 1))]
    cuts = sorted(set(lowest.tolist()) | set((similarity < tau).nonzero().squeeze(1).tolist()))
    bounds = [-1, *cuts, frames - 1]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def context_counts(sizes: list[int], context: int, p: int) -> list[int]:
    """Context tokens per frame: in a segment of L frames, C L // ceil(L / p) for its anchor frames (the last and
    every p-th before it), 0 for the others."""
    out = []
    for length in sizes:
        per_anchor = context * length // -(-length // p)
        out += [per_anchor if (length - 1 - j) % p == 0 else 0 for j in range(length)]
    return out


def density_scores(x: torch.Tensor) -> torch.Tensor:
    """(F, m) DPC-kNN score delta * rho of (F, m, D) tokens, per frame (ties of rho: the lower index is denser)."""
    _, m, dim = x.shape
    distance = torch.cdist(x, x) / dim**0.5
    nearest = torch.topk(distance, k=min(NEIGHBOURS, m), dim=-1, largest=False).values
    rho = torch.exp(-(nearest**2).mean(dim=-1))  # (F, m)
    index = torch.arange(m, device=x.device)
    denser = (rho[:, None, :] > rho[:, :, None]) | (  # [f, i, j]: token j is denser than token i
        (rho[:, None, :] == rho[:, :, None]) & (index[None, None, :] < index[None, :, None])
    )
    far = distance.flatten(1).max(dim=-1).values[:, None, None]
    delta = torch.where(denser, distance, far).min(dim=-1).values
    return delta * rho


def top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row, highest first (ties: the lower index first)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def merge_into(targets: torch.Tensor, members: torch.Tensor, beta: float) -> torch.Tensor:
    """DTM: (A, k, D) targets, (A, M, D) tokens to merge; each token joins its most cosine-similar target; a target
    becomes w target + (1 - w) mean(its tokens), w = max(1 / (count + 1), beta)."""
    similarity = F.normalize(members, dim=-1) @ F.normalize(targets, dim=-1).transpose(1, 2)  # (A, M, k)
    assign = F.one_hot(similarity.argmax(dim=-1), targets.shape[1]).to(members.dtype)  # (A, M, k)
    counts = assign.sum(dim=1)[..., None]  # (A, k, 1)
    mean = assign.transpose(1, 2) @ members / counts.clamp(min=1)
    weight = (1 / (counts + 1)).clamp(min=beta)
    return weight * targets + (1 - weight) * mean


def fastvid_select(
    features: torch.Tensor,
    attention: torch.Tensor,
    global_features: torch.Tensor,
    retain: int,
    c: int = 8,
    tau: float = 0.9,
    d: float = 0.4,
    p: int = 4,
    beta: float = 0.6,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One video: (T, n, D) features, (T, n) attention scores, (T, D') frame global features, `retain` tokens per
    frame. Returns (keep mask (T, n), features (T, n, D) with the merged tokens written at their targets, segments)."""
    frames, n, dim = features.shape
    device = features.device
    x = features.float()
    sizes = segment_sizes(global_features, c, tau)
    salient_k = retain - int(retain * d)
    context = retain - salient_k
    counts = context_counts(sizes, context, p)
    keep = torch.zeros(frames, n, dtype=torch.bool, device=device)
    out = x.clone()
    salient = top_sorted(attention.float(), salient_k)  # (T, S)
    keep.scatter_(1, salient, True)
    if context == 0 or salient_k >= n:
        return keep, out.to(features.dtype), sizes
    rest = (~keep).nonzero()[:, 1].view(frames, n - salient_k)  # (T, m) remaining tokens, ascending
    tokens = x.gather(1, rest[..., None].expand(-1, -1, dim))  # (T, m, D)
    score = density_scores(tokens)
    frame_index = torch.arange(frames, device=device)

    def place(rows: torch.Tensor, picked: torch.Tensor, merged: torch.Tensor) -> None:
        """Keep the remaining tokens `picked` (A, k) of frames `rows` (A,), with their merged features."""
        columns = rest[rows[:, None], picked]
        keep[rows[:, None], columns] = True
        out[rows[:, None], columns] = merged

    single = frame_index[torch.tensor(counts, device=device) == context]
    if len(single):  # one-frame segments (and any frame given exactly C): merge within the frame
        picked = top_sorted(score[single], context)
        merged = merge_into(tokens[single].gather(1, picked[..., None].expand(-1, -1, dim)), tokens[single], beta)
        place(single, picked, merged)
    start = 0
    for length in sizes:
        if length > 1:
            seg_counts = torch.tensor(counts[start : start + length], device=device)
            anchors = start + (seg_counts > context).nonzero().squeeze(1)
            k = min(counts[start + length - 1], n - salient_k)
            if len(anchors) and k > 0:
                picked = top_sorted(score[anchors], k)
                targets = tokens[anchors].gather(1, picked[..., None].expand(-1, -1, dim))
                members = tokens[start : start + length].reshape(1, -1, dim).expand(len(anchors), -1, -1)
                place(anchors, picked, merge_into(targets, members, beta))
        start += length
    return keep, out.to(features.dtype), sizes


@register_strategy
class FastVID(Strategy):
    name = "fastvid"
    aliases = ("fast_vid",)
    stage = "pre_llm"
    paper = "Shen et al., FastVID: Dynamic Density Pruning for Fast Video LLMs, NeurIPS 2025"
    default_keep = 0.10
    last_plan = PerThread([])  # per video of the last prefill: key, segments, tokens kept per frame

    def __init__(
        self,
        keep: float | int = 0.10,
        c: int = 8,
        tau: float = 0.9,
        d: float = 0.4,
        p: int = 4,
        beta: float = 0.6,
        frames: str = "video",
    ):
        super().__init__(keep)
        if frames not in FRAMES:
            raise ValueError(f"frames must be one of {', '.join(FRAMES)}, got {frames!r}")
        if c < 1 or p < 1 or not 0 <= d <= 1:
            raise ValueError(f"fastvid needs c >= 1, p >= 1 and 0 <= d <= 1 (official: 8, 4, 0.4), got {c}, {p}, {d}")
        self.c, self.tau, self.d, self.p, self.beta, self.frames = c, tau, d, p, beta, frames

    def vision_probes(self, num_layers: int, feature_layer: int) -> dict[str, list[int]]:
        return {"received": [feature_layer]}

    def describe(self) -> str:
        return f"fastvid(keep={self.keep}, c={self.c}, tau={self.tau}, d={self.d}, p={self.p}, beta={self.beta})"

    def select(self, visual: VisualTokens):
        n, k = visual.num_tokens, visual.budget
        device = visual.features.device
        if k >= n:
            return torch.arange(n, device=device).expand(visual.num_images, -1)
        (received,) = visual.received_attention.values()
        attention = received.float().mean(dim=1)  # (I, N): mean over heads
        keep = torch.zeros(visual.num_images, n, dtype=torch.bool, device=device)
        merged = visual.features.clone()
        plan = []
        for key, rows in video_rows(visual, self.frames):
            index = torch.tensor(rows, device=device)
            features = visual.features[index]
            mask, values, sizes = fastvid_select(
                features,
                attention[index],
                features.float().mean(dim=1),
                k,
                self.c,
                self.tau,
                self.d,
                self.p,
                self.beta,
            )
            keep[index], merged[index] = mask, values
            plan.append(dict(video=key, segments=sizes, kept=mask.sum(dim=1).tolist()))
        self.last_plan = plan
        return keep, merged
