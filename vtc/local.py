"""Per-thread attributes: the state of one call (captured visual masks and probes, layouts, the last report) lives
per thread, so that two threads sharing one patched model never see each other's selections."""

from __future__ import annotations

import copy
import threading


class _Local(threading.local):
    """A thread-local namespace that copies and pickles as an empty one (per-call state is never carried over)."""

    def __deepcopy__(self, memo):
        return _Local()

    def __copy__(self):
        return _Local()

    def __reduce__(self):
        return _Local, ()


class PerThread:
    """A class attribute that makes one instance attribute per thread: `self.x = v` sets it for the calling
    thread only; a thread that never set it reads `default` (copied, so a mutable default is never shared)."""

    def __init__(self, default=None):
        self.default = default

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    @staticmethod
    def _namespace(obj) -> _Local:
        namespace = obj.__dict__.get("_per_thread")
        if namespace is None:  # dict.setdefault is atomic: two threads get the same namespace
            namespace = obj.__dict__.setdefault("_per_thread", _Local())
        return namespace

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        namespace = self._namespace(obj)
        try:
            return getattr(namespace, self.name)
        except AttributeError:
            value = copy.copy(self.default)
            setattr(namespace, self.name, value)
            return value

    def __set__(self, obj, value) -> None:
        setattr(self._namespace(obj), self.name, value)
