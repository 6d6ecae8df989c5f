"""Hooks of the `vtc_video_qa` task (lmms-eval loads this file through `!function utils.<name>`)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc: dict) -> list[str]:
    """The clip's path, as lmms-eval's video tasks return it: the model decodes it."""
    return [str(HERE / doc["video"])]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def first_word(text: str) -> str:
    words = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words else ""


def process_results(doc: dict, results: list[str]) -> dict:
    """Exact match of the first generated word with the answer known from how the clip was drawn."""
    return {"accuracy": float(first_word(results[0]) == doc["answer"])}
