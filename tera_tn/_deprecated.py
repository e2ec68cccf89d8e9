"""Names that left a package's public namespace keep working for one release, with a warning."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import types
import warnings
from typing import Callable, Mapping


def moved_names(package: str, moved: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``moved`` maps each old name to the dotted path of
    the object it now is (``"tera_tn.conditioning"``). Reading an old name warns
    (``DeprecationWarning``) and returns that object; any other missing name raises
    ``AttributeError`` as usual."""

    def __getattr__(name: str) -> object:
        if name not in moved:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = moved[name].rpartition(".")
        warnings.warn(
            f"{package}.{name} is deprecated and will be removed in the next release; use {moved[name]}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), attr)

    return __getattr__


_IMPORT_MACHINERY = ("<frozen importlib", os.path.dirname(importlib.__file__))


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old dotted module name (``tera_tn.spec``) as the module it moved to
    (``tera_tn.core.spec``): the very same module object, so patching through either path patches
    both. Importing an old name warns (``DeprecationWarning``) with the new path."""

    def __init__(self, moved: Mapping[str, str]) -> None:
        self.moved = dict(moved)
        self._specs: dict = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.moved:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = self.moved[spec.name]
        level, frame = 2, sys._getframe(1)  # point the warning at the import statement
        while frame is not None and frame.f_code.co_filename.startswith(_IMPORT_MACHINERY):
            level, frame = level + 1, frame.f_back
        warnings.warn(
            f"{spec.name} is deprecated and will be removed in the next release; use {new}",
            DeprecationWarning,
            stacklevel=level,
        )
        module = importlib.import_module(new)
        self._specs[module.__name__] = module.__spec__
        return module  # the import system keeps its __name__ and __file__ but rebinds __spec__

    def exec_module(self, module) -> None:
        module.__spec__ = self._specs.pop(module.__name__)


class _Package(types.ModuleType):
    """The import system binds an imported submodule on its parent; an old module path imported
    through its alias is not bound, so it cannot hide a public function of the same name
    (``tera_tn.tensorize``) and reading it as an attribute keeps warning (``moved_names``)."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and f"{self.__name__}.{name}" in _ALIASES:
            return
        super().__setattr__(name, value)


_ALIASES: dict = {}


def moved_modules(package: str, moved: Mapping[str, str]) -> None:
    """Keep the old dotted module names in ``moved`` (old -> new, both absolute) importable for one
    release: installs one meta-path finder (once) that aliases each old name to its new module."""
    _ALIASES.update(moved)
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModules(_ALIASES))
    else:
        for f in sys.meta_path:
            if isinstance(f, _MovedModules):
                f.moved.update(moved)
    sys.modules[package].__class__ = _Package
