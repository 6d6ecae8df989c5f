"""One file per method; importing this package registers them all."""

from . import dart, downsample, dyvte, fastv, fopru, random_baseline, todre, tome, visionzip, vtc_cls  # noqa: F401
from .base import Strategy, VisualTokens, list_strategies, register_strategy

__all__ = ["Strategy", "VisualTokens", "list_strategies", "register_strategy"]
