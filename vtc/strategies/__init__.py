"""One file per method; importing this package registers them all."""

from . import (  # noqa: F401
    atp,
    cdpruner,
    dart,
    divprune,
    downsample,
    dycoke,
    dyvte,
    evs,
    fastervlm,
    fastv,
    fastvid,
    fopru,
    hiprune,
    hired,
    holitom,
    holov,
    idpruner,
    mustdrop,
    pdrop,
    pmod,
    prumerge_plus,
    prunevid,
    quota,
    random_baseline,
    scope,
    sparsevlm,
    todre,
    tome,
    vidcom2,
    visionzip,
    vispruner,
    vtc_cls,
)
from .base import Strategy, VisualTokens, list_strategies, register_strategy

__all__ = ["Strategy", "VisualTokens", "list_strategies", "register_strategy"]
