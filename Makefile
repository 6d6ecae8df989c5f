# Two commands that work on a fresh machine (CPU, offline models):
#   make demo   set up .venv and run the demo on the embedded tiny model
#   make test   set up .venv (with lmms-eval for the plug-in's end-to-end test) and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup eval-setup demo test test-real bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
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

# every strategy on the real architectures (vtc.testing.real_model, random weights, 2 decoder layers): slow on a CPU
test-real: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m slow tests/test_real.py

bench: setup
	$(BIN)/vtc bench --model tiny

# one prepared GPU check (kernels, real-size speed, attention path): eval/gpu_check.sh; results under eval/results/gpu/
gpu-check:
	eval/gpu_check.sh

clean:
	rm -rf $(VENV) out .pytest_cache
