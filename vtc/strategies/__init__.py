"""One file per method; importing this package registers them all."""

from . import fastv, fopru, vtc_cls  # noqa: F401
from .base import Strategy, VisualTokens, list_strategies, register_strategy

__all__ = ["Strategy", "VisualTokens", "list_strategies", "register_strategy"]
