"""Names that left a package's public namespace keep working for one release, with a warning."""

from __future__ import annotations

import importlib
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
