"""Hooks of the `vtc_scene_qa` tasks (lmms-eval loads this file through `!function utils.<name>`)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc: dict) -> list:
    """The question's picture, opened from `images/` next to this file, as RGB."""
    with Image.open(HERE / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The bare question: the tiny VLM was trained on exactly this text (the model adds the chat template)."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def doc_to_choice(doc: dict) -> list[str]:
    return list(doc["choices"])


def first_word(text: str) -> str:
    words = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words else ""


def process_results(doc: dict, results: list[str]) -> dict:
    """Exact match of the first generated word; also split by object size (the answer hinges on a 16 px object)."""
    correct = float(first_word(results[0]) == doc["answer"])
    return {"accuracy": correct, "small_accuracy": correct if doc["small"] else None}


def mean_ignoring_none(items: list) -> float:
    values = [v for v in items if v is not None]
    return sum(values) / len(values) if values else float("nan")
