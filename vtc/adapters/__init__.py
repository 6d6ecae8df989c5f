"""One file per model family; importing this package registers them all."""

from . import llava  # noqa: F401
from .base import Adapter, find_adapter, register_adapter, supported_models

__all__ = ["Adapter", "find_adapter", "register_adapter", "supported_models"]
