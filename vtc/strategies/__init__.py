"""One file per method; importing this package registers them all."""

from . import (  # noqa: F401
    atp,
    dart,
    downsample,
    dyvte,
    fastv,
    fopru,
    hiprune,
    hired,
    idpruner,
    mustdrop,
    pdrop,
    pmod,
    quota,
    random_baseline,
    scope,
    sparsevlm,
    todre,
    tome,
    visionzip,
    vtc_cls,
)
from .base import Strategy, VisualTokens, list_strategies, register_strategy

__all__ = ["Strategy", "VisualTokens", "list_strategies", "register_strategy"]
