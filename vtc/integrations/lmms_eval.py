"""lmms-eval model plug-in: evaluate a HuggingFace VLM with a vtc strategy installed.

    lmms-eval --model vtc \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,strategy=fastv,keep=0.25,layer=3 \\
        --tasks mme --batch_size 4 --output_path out/lmms

`--model_args` (comma separated key=value; ints, floats, true/false and none are parsed):

    pretrained          a HF hub id or local checkpoint of a model family vtc supports (`vtc.supported_models()`),
                        loaded with the class its config names (else AutoModelForImageTextToText); or an offline
                        tiny model: `vtc-tiny` (random weights, `vtc.testing.tiny_llava`), `vtc-tiny-vlm` (the
                        tiny LLaVA trained on `vtc.data`, `vtc.testing.load_tiny_vlm`), `vtc-tiny-qwen2-vl`,
                        `vtc-tiny-onevision`, `vtc-tiny-internvl` (random weights, `vtc.testing.load_tiny_model`)
    strategy            a name from `vtc.list_strategies()`; absent: the model runs unpatched (baseline);
                        `none`: patched without compression (reports the visual tokens, FLOPs ratio 1)
    keep                fraction (float in (0, 1]) or count (int) of each image's visual tokens kept
    kv, kv_budget       a decode-time KV-cache policy (`vtc.kv.list_policies()`) and its budget
    kv_options          the policy's options as JSON, e.g. kv_options='{"window":16}'
    device              default cuda when available, else cpu
    device_map          passed to from_pretrained (auto, balanced, sequential...): accelerate spreads the model over
                        the GPUs, the CPU and the disk; with `max_memory` (`0:70GiB;cpu:100GiB`, semicolons) and
                        `offload_folder` (for layers placed on the disk)
    dtype               auto (default), float32, float16 or bfloat16
    attn_implementation sdpa (default) or eager: vtc's decoder loop supports these two
    batch_size          requests per forward (left padding); lmms-eval's --batch_size sets it too
    max_frames          frames sampled from each video file, evenly spread (default 8; all frames of a shorter clip)
    video_fps           sample this many frames per second of video instead (still at most max_frames)
    max_new_tokens      when a task's generation_kwargs do not say (default 256)
    use_chat_template   wrap each question in the processor's chat template (default true)
    system_prompt       a system message (or a file holding one) put before each question
    revision, trust_remote_code   passed to from_pretrained
    anything else       a strategy option, e.g. layer=3 for fastv, queries=text, mode=row for fopru

vtc's report is averaged over the requests of each lmms-eval call and lands in the results file under
"throughput" as `avg_vtc_visual_in`, `avg_vtc_visual_pre_llm`, `avg_vtc_visual_kept` (visual tokens per sample at
the last decoder layer), `avg_vtc_keep_ratio`, `avg_vtc_flops_ratio` (estimated LLM prefill FLOPs vs the
unpatched model), `avg_vtc_flops` and `avg_vtc_flops_unpatched` (the estimates per sample);
`VTCModel.vtc_summary()` gives the same numbers from Python.

Data parallel: `accelerate launch --num_processes N -m lmms_eval --model vtc ...` (or torchrun) loads one replica per
process (on `cuda:<local rank>`, or the CPU when `device=cpu` or no GPU: a gloo group); lmms-eval gives each process
its share of the requests and gathers the results; the padding requests lmms-eval adds to the shorter shares are
answered without running the model. vtc's throughput numbers are summed over the processes (elapsed time: the
slowest process's).

Video tasks: `doc_to_visual` may return video file paths (decoded by `vtc.video.load_video`: decord where installed,
else PyAV), `vtc.video.Video` objects, (T, H, W, 3) uint8 arrays, or a list of PIL frames nested in the returned
list (`[[frame0, frame1, ...]]`; a flat list of PIL images is several images). Each video enters the prompt as
`{"type": "video"}` content of the processor's chat template and the processor's own `__call__` builds the family's
video inputs (with the frame timestamps for Qwen2.5-VL / Qwen3-VL); a processor without a video processor (none is
built without torchvision) gets `vtc.video.FramesVideoProcessor`. Strategies that take the processor (`quota`) get
the model's. Requests with videos are batched only with requests whose videos have the same frame counts.

Without the entry point (vtc not pip-installed, only on PYTHONPATH): `python -m vtc.integrations.lmms_eval ...`
takes the same arguments as `lmms-eval`.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from PIL import Image
from tqdm import tqdm

import vtc
from vtc.adapters.decoder import execution_device
from vtc.strategies.base import get_strategy_class
from vtc.testing import TINY_MODEL_IDS as TINY_MODELS
from vtc.video import Video, as_video, ensure_video_processor, is_video_path, load_video

_MAX_ROUNDS = 32  # generate_until_multi_round stops here even when the task never signals the end


def parse_value(value):
    """A `--model_args` value: "true"/"false" -> bool, "none" -> None, "3" -> 3, "0.25" -> 0.25, a JSON object
    or list -> its value, else the string. Values lmms-eval already parsed pass through."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    lower = text.lower()
    if lower in ("true", "false"):
        return lower == "true"
    if lower in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    if text[:1] in "{[" and text[-1:] in "}]":
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def parse_max_memory(text: str | dict) -> dict:
    """`0:70GiB;1:70GiB;cpu:200GiB` (semicolons: --model_args splits on commas) -> from_pretrained's max_memory."""
    if isinstance(text, dict):
        return text
    pairs = [part.split(":", 1) for part in str(text).split(";") if part.strip()]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"max_memory={text!r}: write device:size pairs separated by ';', e.g. 0:70GiB;cpu:200GiB")
    return {int(k) if k.strip().isdigit() else k.strip(): v.strip() for k, v in pairs}


def load_model(pretrained: str, *, device: str, dtype="auto", attn_implementation="sdpa", device_map=None, **kw):
    """(model, processor) for a hub id, a local checkpoint or one of TINY_MODELS; model in eval mode on `device`."""
    if pretrained in TINY_MODELS:
        if device_map is not None:
            raise ValueError(
                f"device_map needs a checkpoint: save {pretrained} with save_pretrained (model and processor, see "
                "vtc.testing.load_tiny_model) and pass its directory as pretrained"
            )
        from vtc.testing import load_tiny_model

        model, processor = load_tiny_model(pretrained, attn_implementation)
    else:
        import transformers
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        common = {k: v for k, v in kw.items() if k in ("revision", "trust_remote_code") and v is not None}
        config = AutoConfig.from_pretrained(pretrained, **common)
        names = [a for a in (getattr(config, "architectures", None) or []) if hasattr(transformers, a)]
        cls = getattr(transformers, names[0]) if names else AutoModelForImageTextToText
        torch_dtype = dtype if dtype in (None, "auto") else getattr(torch, str(dtype))
        load = dict(common, dtype=torch_dtype, attn_implementation=attn_implementation)
        if device_map is not None:  # accelerate dispatches the model; vtc's tensors follow its layers
            load["device_map"] = device_map
            if kw.get("max_memory"):
                load["max_memory"] = parse_max_memory(kw["max_memory"])
            if kw.get("offload_folder"):
                load["offload_folder"] = kw["offload_folder"]
        model = cls.from_pretrained(pretrained, **load)
        processor = AutoProcessor.from_pretrained(pretrained, **common)
    if device_map is None:
        model = model.to(device)
    if dtype not in (None, "auto") and pretrained in TINY_MODELS:
        model = model.to(getattr(torch, str(dtype)))
    return model.eval(), processor


class VTCModel(lmms):
    """A HF VLM (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, ... : `vtc.supported_models()`) with a vtc
    strategy installed. See the module docstring for the arguments."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "vtc-tiny",
        strategy: str | None = None,
        keep: float | int | None = None,
        kv: str | None = None,
        kv_budget: int | None = None,
        kv_options: dict | str | None = None,
        device: str | None = None,
        device_map: str | None = None,
        max_memory: str | None = None,
        offload_folder: str | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        batch_size: int | str = 1,
        max_new_tokens: int = 256,
        max_frames: int = 8,
        video_fps: float | None = None,
        use_chat_template: bool = True,
        system_prompt: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        max_batch_size: int | None = None,  # lmms-eval passes these to every model; not used
        **strategy_options,
    ) -> None:
        super().__init__()
        strategy_options = {k: parse_value(v) for k, v in strategy_options.items()}
        keep, kv_budget, kv_options = parse_value(keep), parse_value(kv_budget), parse_value(kv_options)
        if device in (None, "", "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # data parallel (accelerate launch / torchrun): one replica per process, lmms-eval splits the requests
        self.accelerator = Accelerator(cpu=torch.device(device).type == "cpu")
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        if self._world_size > 1 and device_map is None and torch.device(device).type == "cuda":
            device = f"cuda:{self.accelerator.local_process_index}"
        batch_size = parse_value(batch_size)
        if not isinstance(batch_size, int):
            eval_logger.warning(f"vtc: batch_size={batch_size!r} is not an int; using 1")
            batch_size = 1
        self.batch_size_per_gpu = max(1, batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.max_frames, self.video_fps = int(parse_value(max_frames)), parse_value(video_fps)
        self.use_chat_template = bool(parse_value(use_chat_template))
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        self.model, self.processor = load_model(
            str(pretrained),
            device=device,
            dtype=parse_value(dtype),
            attn_implementation=attn_implementation,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload_folder,
            revision=revision,
            trust_remote_code=bool(parse_value(trust_remote_code)),
        )
        self._device = execution_device(self.model.get_input_embeddings())  # with device_map: where inputs go
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # "none" is a strategy here (patched, no compression: vtc's numbers at keep 1), not parse_value's None
        none = isinstance(strategy, str) and strategy.strip().lower() == "none"
        self.strategy = "none" if none else parse_value(strategy)
        self.handle = None
        if self.strategy is not None or kv is not None:
            if _takes_processor(self.strategy):  # quota builds its frame prompts with it
                strategy_options.setdefault("processor", self.processor)
            self.handle = vtc.patch(
                self.model,
                self.strategy,
                keep,
                kv=kv,
                kv_budget=kv_budget,
                kv_options=kv_options,
                **strategy_options,
            )
            eval_logger.info(f"vtc: {self.handle!r}")
        elif strategy_options or keep is not None:
            raise ValueError(f"keep/strategy options {sorted(strategy_options) or ['keep']} given without a strategy")
        self._totals = _Totals()
        self.reused = False

    # --- what lmms-eval reads -------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def clean(self) -> None:
        """lmms-eval calls this after the requests to free the model (e.g. for an LLM judge); kept while
        `set_strategy` reuses the model across runs (`vtc eval`)."""
        if not self.reused:
            super().clean()

    def set_strategy(self, strategy: str | None, keep: float | int | None = None, **options):
        """Unpatch the model and, unless `strategy` is None, patch it with `strategy` at `keep` (one loaded model,
        many runs: `vtc eval`). The running numbers start again. Returns the new handle (None: unpatched)."""
        if self.handle is not None:
            self.handle.unpatch()
        self.handle = vtc.patch(self.model, strategy, keep, **options) if strategy is not None else None
        self.strategy = strategy
        self._totals = _Totals()
        self.reused = True
        return self.handle

    def vtc_summary(self) -> dict:
        """Means over every sample run so far: visual tokens in, after the pre-LLM stage, at the last decoder
        layer (kept), their ratio, and the estimated LLM prefill FLOPs vs the unpatched model."""
        return self._totals.summary()

    # --- prompts and inputs ---------------------------------------------------------------------------
    def _prompt(self, context: str, n_images: int, n_videos: int = 0) -> str:
        context = context.replace("<image>", "").strip() if n_images else context
        context = context.replace("<video>", "").strip() if n_videos else context
        chat = self.use_chat_template and getattr(self.processor, "chat_template", None)
        if not chat:
            image, video = getattr(self.processor, "image_token", "<image>"), getattr(self.processor, "video_token", "")
            return f"{image}\n" * n_images + f"{video}\n" * n_videos + context
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "video"} for _ in range(n_videos)]
        content.append({"type": "text", "text": context})
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _visuals(self, doc_to_visual, doc_id, task, split) -> tuple[list[Image.Image], list[Video]]:
        """The request's (images, videos) from what the task's doc_to_visual returns."""
        if doc_to_visual is None:
            return [], []
        return self._split_visuals(doc_to_visual(self.task_dict[task][split][doc_id]) or [])

    def _split_visuals(self, visuals) -> tuple[list[Image.Image], list[Video]]:
        images, videos = [], []
        for visual in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
            if isinstance(visual, (list, tuple)) and visual and all(isinstance(v, Image.Image) for v in visual):
                videos.append(as_video(visual))  # nested PIL frames: one video
            elif isinstance(visual, (list, tuple)):
                more_images, more_videos = self._split_visuals(visual)
                images += more_images
                videos += more_videos
            elif isinstance(visual, Image.Image):
                images.append(visual.convert("RGB"))
            elif is_video_path(visual):
                videos.append(load_video(visual, fps=self.video_fps, max_frames=self.max_frames))
            elif isinstance(visual, (str, Path)) and Path(visual).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
                with Image.open(visual) as opened:
                    images.append(opened.convert("RGB"))
            elif isinstance(visual, (Video, np.ndarray, torch.Tensor)):
                videos.append(as_video(visual))
            else:
                raise NotImplementedError(
                    f"the vtc plug-in takes images (PIL, image paths) and videos (video paths, (T, H, W, 3) arrays, "
                    f"nested lists of PIL frames), got {type(visual).__name__}: {visual!r:.200}"
                )
        return images, videos

    def _inputs(self, texts: list[str], images: list[list[Image.Image]], videos: list[list[Video]] | None = None):
        flat = [im for per_sample in images for im in per_sample]
        clips = [clip for per_sample in videos or [] for clip in per_sample]
        kwargs = {"images": flat} if flat else {}
        if clips:
            if getattr(self.processor, "video_token", None) is None:
                raise ValueError(
                    f"{type(self.model).__name__} takes no video (its processor has no video token): evaluate video "
                    "tasks on a video model (LLaVA-OneVision, Qwen2-VL / 2.5-VL, Qwen3-VL, InternVL)"
                )
            ensure_video_processor(self.processor)
            # frames are sampled already (do_sample_frames=False); the metadata carries fps and frame indices
            kwargs.update(
                videos=[c.frames for c in clips], video_metadata=[c.metadata for c in clips], do_sample_frames=False
            )
        batch = self.processor(text=texts, return_tensors="pt", padding=True, **kwargs)
        dtype = next(self.model.parameters()).dtype
        return {
            k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in batch.items()
            if isinstance(v, torch.Tensor)  # not the video metadata some processors hand back
        }

    def _record(self, n: int, started: float, gen_tokens: int = 0) -> None:
        self._totals.seconds += time.perf_counter() - started
        self._totals.requests += n
        self._totals.gen_tokens += gen_tokens
        if self.handle is not None:
            self._totals.add(self.handle.report())

    # --- lmms-eval API --------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy or sampled generation, batched by identical generation kwargs, longest prompts first."""
        if _has_padding(requests):
            return _skip_padding(requests, self.generate_until, "")
        start = self._totals.snapshot()
        prepared = []
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args[:6]
            images, videos = self._visuals(doc_to_visual, doc_id, task, split)
            prompt = self._prompt(context, len(images), len(videos))
            prepared.append((index, prompt, images, dict(gen_kwargs or {}), videos))
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list] = {}
        for item in prepared:
            key = json.dumps([item[3], _frame_counts(item[4])], sort_keys=True, default=str)
            groups.setdefault(key, []).append(item)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="vtc generate")
        for items in groups.values():
            items.sort(key=lambda item: -len(item[1]))
            for i in range(0, len(items), self.batch_size):
                chunk = items[i : i + self.batch_size]
                texts = self._generate([c[1] for c in chunk], [c[2] for c in chunk], chunk[0][3], [c[4] for c in chunk])
                for (index, *_), text in zip(chunk, texts):
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args[:2], text)
                bar.update(len(chunk))
        bar.close()
        self._log(start)
        return results

    def _generate(
        self, prompts: list[str], images: list[list[Image.Image]], gen_kwargs: dict, videos: list | None = None
    ) -> list[str]:
        started = time.perf_counter()
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
        kwargs = dict(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
            do_sample=do_sample,
            num_beams=int(gen_kwargs.get("num_beams", 1) or 1),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if do_sample:
            kwargs["temperature"] = temperature or 1.0
            if gen_kwargs.get("top_p") is not None:
                kwargs["top_p"] = float(gen_kwargs["top_p"])
        inputs = self._inputs(prompts, images, videos)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        cut = []
        for text in texts:
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            cut.append(text.strip())
        pad = self.tokenizer.pad_token_id
        self._record(len(prompts), started, int((new != pad).sum()) if pad is not None else new.numel())
        return cut

    def loglikelihood(self, requests: list[Instance]) -> list:
        """Per request (context, continuation): (the mean negative log-likelihood of the continuation's tokens,
        whether greedy decoding would produce them). A loss, as lmms-eval's HF models return: its multiple-choice
        scoring takes the argmin. One forward of prompt + continuation per request, batched.

        Each pair is wrapped in a `GenerationResult`: lmms-eval 0.7.3's evaluator passes every response through
        `unwrap_generation_output`, which turns a bare (float, bool) tuple into its string; the wrapper's `text`
        is handed on as is."""
        if _has_padding(requests):
            return _skip_padding(requests, self.loglikelihood, GenerationResult(text=(0.0, False)))
        start = self._totals.snapshot()
        prepared = []
        for request in requests:
            context, continuation, doc_to_visual, doc_id, task, split = request.args[:6]
            images, videos = self._visuals(doc_to_visual, doc_id, task, split)
            if callable(continuation):
                continuation = continuation(self.task_dict[task][split][doc_id])
            prompt = self._prompt(context, len(images), len(videos))
            n_prompt = len(self.tokenizer(prompt)["input_ids"])
            n_cont = max(1, len(self.tokenizer(prompt + str(continuation))["input_ids"]) - n_prompt)
            prepared.append((prompt + str(continuation), images, n_cont, videos))
        results = []
        chunks = _runs(prepared, self.batch_size, key=lambda item: _frame_counts(item[3]))
        for chunk in tqdm(chunks, disable=self.rank != 0, desc="vtc loglikelihood"):
            started = time.perf_counter()
            inputs = self._inputs([c[0] for c in chunk], [c[1] for c in chunk], [c[3] for c in chunk])
            with torch.inference_mode():
                logits = self.model(**inputs).logits.float()
            # left padding: every row ends with its continuation (a vtc-patched forward drops visual rows only,
            # so the last rows are still the text's last positions)
            for row, (_, _, n, _) in enumerate(chunk):
                targets = inputs["input_ids"][row, -n:]
                scores = torch.log_softmax(logits[row, -n - 1 : -1], dim=-1)
                nll = -scores.gather(-1, targets[:, None]).mean()
                greedy = bool((scores.argmax(-1) == targets).all())
                results.append(GenerationResult(text=(float(nll), greedy)))
            self._record(len(chunk), started)
        self._log(start)
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """One request at a time: round 0 answers the context; the task's doc_to_text(doc, previous_output=...,
        round_idx=..., previous_round_info=...) gives (visuals, text, done, round outputs, info) for the next."""
        if _has_padding(requests):
            return _skip_padding(requests, self.generate_until_multi_round, [])
        start = self._totals.snapshot()
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="vtc multi-round"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args[:7]
            doc = self.task_dict[task][split][doc_id]
            images, videos = self._visuals(doc_to_visual, doc_id, task, split)
            rounds: list[str] = []
            info = None
            for round_idx in range(_MAX_ROUNDS):
                if round_idx:
                    visuals, context, done, rounds, info = doc_to_text(
                        doc, previous_output=rounds, round_idx=round_idx, previous_round_info=info
                    )
                    rounds = list(rounds)
                    if done:
                        break
                    images, videos = self._split_visuals(visuals or [])
                prompt = self._prompt(context, len(images), len(videos))
                rounds += self._generate([prompt], [images], dict(gen_kwargs or {}), [videos])
            results.append(rounds)
        self._log(start)
        return results

    def _log(self, start: dict) -> None:
        """Throughput and vtc's numbers for the requests of this call, into lmms-eval's results ("throughput").
        Under data parallelism every process calls this once per request type; the numbers are summed over the
        processes (time: the slowest process, so avg_speed is the run's throughput) and logged on each."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        delta = self._totals.delta(start)
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            every = [None] * self.world_size
            torch.distributed.all_gather_object(every, delta)
            eval_logger.info(f"vtc: process {self.rank} of {self.world_size} ran {delta['requests']} requests")
            delta = {k: (max if k == "seconds" else sum)(d[k] for d in every) for k in delta}
        extra = {k: v for k, v in _means(delta).items() if k != "vtc_samples"}
        seconds, tokens = delta["seconds"], delta["gen_tokens"]
        log_metrics(
            total_elapsed_time=seconds,
            total_gen_tokens=tokens,
            avg_speed=tokens / seconds if seconds > 0 else 0.0,
            additional_metrics=dict(extra, total_requests=delta["requests"]),
        )
        if extra:
            eval_logger.info("vtc report: " + ", ".join(f"{k}={v:.4g}" for k, v in extra.items()))


class _Totals:
    """Running sums of vtc's per-sample report (samples with visual tokens only)."""

    FIELDS = ("visual_in", "visual_pre_llm", "visual_kept", "flops_ratio", "flops", "flops_unpatched")

    def __init__(self) -> None:
        self.seconds, self.requests, self.gen_tokens, self.samples = 0.0, 0, 0, 0
        self.sums = dict.fromkeys(self.FIELDS, 0.0)

    def add(self, report) -> None:
        for s in report.samples:
            if not s.visual_in:
                continue
            self.samples += 1
            self.sums["visual_in"] += s.visual_in
            self.sums["visual_pre_llm"] += s.visual_after_pre_llm
            self.sums["visual_kept"] += s.visual_per_layer[-1] if s.visual_per_layer else 0
            self.sums["flops_ratio"] += s.flops_ratio
            self.sums["flops"] += s.flops  # estimated LLM prefill FLOPs, and those of the unpatched model
            self.sums["flops_unpatched"] += s.flops_unpatched

    def snapshot(self) -> dict:
        return {"seconds": self.seconds, "requests": self.requests, "gen_tokens": self.gen_tokens,
                "samples": self.samples, **self.sums}  # fmt: skip

    def delta(self, start: dict) -> dict:
        now = self.snapshot()
        return {k: now[k] - start[k] for k in now}

    def summary(self) -> dict:
        return _means(self.snapshot())


def _means(sums: dict) -> dict:
    n = sums["samples"]
    if not n:
        return {}
    out = {f"vtc_{k}": sums[k] / n for k in _Totals.FIELDS}
    out["vtc_keep_ratio"] = sums["visual_kept"] / sums["visual_in"] if sums["visual_in"] else 1.0
    out["vtc_samples"] = n
    return out


def _is_padding(request: Instance) -> bool:
    """lmms-eval pads the shorter processes' request lists with copies marked `__padding_only__` (so that every
    process runs as many batches); their answers are dropped. vtc's replicas share no collective in forward, so
    it does not run them: they would count twice in the throughput numbers."""
    return bool((request.metadata or {}).get("__padding_only__"))


def _has_padding(requests: list[Instance]) -> bool:
    return any(_is_padding(r) for r in requests)


def _skip_padding(requests: list[Instance], run, filler) -> list:
    """`run` on the real requests; `filler` answers each padding request."""
    answers = iter(run([r for r in requests if not _is_padding(r)]))
    return [filler if _is_padding(r) else next(answers) for r in requests]


def _takes_processor(strategy) -> bool:
    """Whether the strategy named `strategy` takes the model's processor (unknown names: vtc.patch says so)."""
    try:
        cls = get_strategy_class(strategy) if isinstance(strategy, str) else None
    except ValueError:
        return False
    return cls is not None and "processor" in inspect.signature(cls).parameters


def _frame_counts(videos: list[Video]) -> list[int]:
    """A request's batching signature: the frame count of each of its videos (processors stack equal counts)."""
    return [len(v) for v in videos]


def _runs(items: list, size: int, key) -> list[list]:
    """`items` cut in order into chunks of at most `size` consecutive items with the same `key`."""
    chunks: list[list] = []
    for item in items:
        if chunks and len(chunks[-1]) < size and key(chunks[-1][0]) == key(item):
            chunks[-1].append(item)
        else:
            chunks.append([item])
    return chunks


def main() -> None:
    """`python -m vtc.integrations.lmms_eval ARGS` = `lmms-eval ARGS` with the plug-in registered by hand."""
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    from vtc.integrations import register_with_lmms_eval

    register_with_lmms_eval()
    lmms_eval_main()


if __name__ == "__main__":
    main()
