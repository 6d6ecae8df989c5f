"""vtc: visual-token compression for HuggingFace vision-language models.

import vtc
handle = vtc.patch(model, strategy="fastv", keep=0.5)
model.generate(**inputs)
print(handle.report())
handle.unpatch()
"""

from .adapters import supported_models
from .api import PatchHandle, Report, patch, patched, unpatch
from .strategies import Strategy, VisualTokens, list_strategies, register_strategy
from .train import train

__version__ = "0.1.0"

__all__ = [
    "PatchHandle",
    "Report",
    "Strategy",
    "VisualTokens",
    "list_strategies",
    "patch",
    "patched",
    "register_strategy",
    "supported_models",
    "train",
    "unpatch",
]
