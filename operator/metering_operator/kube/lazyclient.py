"""Import the ``kubernetes`` client's API and model classes when first used, not all at start.

``kubernetes.client`` (and its ``models`` and ``api`` packages) import every generated class in
their ``__init__``: about 700 models and 60 API groups, 55 MiB of RSS before the operator does any
work (measured: ``import kubernetes.client`` alone; kopf imports it too when it is installed). The
operator touches a handful of them. :func:`install` -- called by ``metering-operator run`` before
anything imports the client -- makes those three package ``__init__`` modules lazy: each name they
would have imported (``from kubernetes.client.models.v1_pod import V1Pod``) is listed from the file
itself and imported on first attribute access (a module ``__getattr__``, PEP 562), so
``client.CoreV1Api``, ``getattr(kubernetes.client.models, "V1Pod")`` (the client's own
deserialisation) and ``from kubernetes.client import V1ObjectMeta`` (kopf) all work unchanged.

Only lines of exactly that generated form are made lazy; any other statement of the file runs as
written. If the files do not look as expected (another client version), nothing is changed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import re
import sys
import types
from collections.abc import Sequence
from typing import Any

_PACKAGES = ("kubernetes.client", "kubernetes.client.models", "kubernetes.client.api")
_LAZY_LINE = re.compile(r"^from (kubernetes\.client\.[\w.]+) import (\w+)\s*$")


class _LazyInitLoader(importlib.abc.Loader):
    def __init__(self, origin: str) -> None:
        self._origin = origin

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        with open(self._origin, encoding="utf-8") as source:
            lines = source.read().splitlines()
        lazy: dict[str, str] = {}
        kept: list[str] = []
        for line in lines:
            match = _LAZY_LINE.match(line)
            if match:
                lazy[match.group(2)] = match.group(1)
            else:
                kept.append(line)

        def __getattr__(name: str) -> Any:
            target = lazy.get(name)
            if target is None:
                raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")
            value = getattr(importlib.import_module(target), name)
            setattr(module, name, value)
            return value

        def __dir__() -> list[str]:
            return sorted(set(module.__dict__) | set(lazy))

        module.__getattr__ = __getattr__  # type: ignore[method-assign]
        module.__dir__ = __dir__  # type: ignore[method-assign]
        exec(compile("\n".join(kept), self._origin, "exec"), module.__dict__)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _PACKAGES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None or not spec.origin.endswith("__init__.py"):
            return None
        spec.loader = _LazyInitLoader(spec.origin)
        return spec


def install() -> bool:
    """Make the client's packages lazy; False when it is too late (already imported) or done."""
    if any(name in sys.modules for name in _PACKAGES):
        return False
    if any(isinstance(finder, _Finder) for finder in sys.meta_path):
        return False
    sys.meta_path.insert(0, _Finder())
    return True
