"""Integrations of vtc with evaluation frameworks.

`vtc.integrations.lmms_eval` is a model plug-in for lmms-eval (>= 0.7): `lmms-eval --model vtc --model_args
pretrained=llava-hf/llava-1.5-7b-hf,strategy=fastv,keep=0.25 --tasks ...`. lmms-eval finds it through the
entry point group "lmms_eval.models" (pyproject.toml), whose payload is `lmms_eval_models` below. This package
imports nothing heavy, so listing the entry points costs nothing when lmms-eval is not installed.
"""

from __future__ import annotations

MODEL_ID = "vtc"
MODEL_ALIASES = ("vtc_hf",)
MODEL_CLASS_PATH = "vtc.integrations.lmms_eval.VTCModel"


def lmms_eval_models():
    """The lmms-eval registration payload: a `ModelManifest` naming the plug-in's model class (imported lazily,
    only when `--model vtc` is asked for)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH, aliases=MODEL_ALIASES)


def register_with_lmms_eval() -> None:
    """Register the plug-in in the running lmms-eval's model registry by hand, for when the entry point is not
    installed (vtc used from a source tree on PYTHONPATH). `python -m vtc.integrations.lmms_eval` calls it."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(lmms_eval_models(), overwrite=True)
