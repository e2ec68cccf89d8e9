"""Checks the installed PEFT and teaches its ``PeftType`` enum the member ``TERA``.

PEFT's :func:`peft.utils.register_peft_method` accepts only names that already exist in the
``PeftType`` string enum. ``tera_tn`` therefore adds one member, ``PeftType.TERA == "TERA"``,
the way ``aenum.extend_enum`` does: it builds the member with the enum's own ``str`` mixin and
adds it to the enum's member maps (``_member_map_``, ``_value2member_map_``, ``_member_names_``)
and class namespace. Nothing of PEFT's source is changed and every existing member is untouched.

The step relies on internals, so it runs only after checks:

* the installed PEFT version lies in the tested range :data:`SUPPORTED_PEFT` (override with the
  environment variable ``TERA_TN_ALLOW_UNTESTED_PEFT=1`` at your own risk);
* the internals used are present (``PeftType`` member maps, ``peft.mapping`` registries,
  ``register_peft_method``, the tuner state-dict hooks ``_get_adapter_state_dict`` /
  ``_remap_adapter_state_dict_for_load``).

Either failure raises :class:`IncompatiblePeftError` (an ``ImportError``) that names the installed
and the supported PEFT versions. Extending and registering are idempotent.
"""

from __future__ import annotations

import os
import re
import warnings

__all__ = [
    "SUPPORTED_PEFT",
    "TESTED_PEFT_VERSIONS",
    "IncompatiblePeftError",
    "peft_version",
    "check_peft",
    "extend_peft_type",
]

#: The PEFT range tera_tn.peft is tested against (lower bound inclusive, upper exclusive).
SUPPORTED_PEFT = ">=0.21,<0.22"
_MIN, _MAX_EXCL = (0, 21), (0, 22)
#: Versions the test suite actually ran against.
TESTED_PEFT_VERSIONS = ("0.21.0", "0.21.2")
_ENV_ALLOW = "TERA_TN_ALLOW_UNTESTED_PEFT"
PEFT_TYPE_NAME = "TERA"


class IncompatiblePeftError(ImportError):
    """The installed PEFT cannot host the TeRA tuner (version out of range or internals differ)."""


def peft_version() -> str:
    import peft

    return str(getattr(peft, "__version__", "unknown"))


def _parse(version: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if not m:
        return ()
    return tuple(int(g) for g in m.groups() if g is not None)


def _fail(reason: str) -> IncompatiblePeftError:
    return IncompatiblePeftError(
        f"tera_tn.peft cannot register TeRA with the installed PEFT {peft_version()}: {reason}. "
        f"Supported PEFT versions: {SUPPORTED_PEFT} (tested: {', '.join(TESTED_PEFT_VERSIONS)}); "
        f"install one with `pip install 'peft{SUPPORTED_PEFT}'`."
    )


def check_peft() -> None:
    """Raise :class:`IncompatiblePeftError` unless the installed PEFT can host the tuner."""
    try:
        import peft  # noqa: F401
    except ImportError as e:  # pragma: no cover - the extra is not installed
        raise IncompatiblePeftError(
            f"tera_tn.peft needs the `peft` package ({SUPPORTED_PEFT}); install tera_tn[peft]: {e}"
        ) from None
    version = peft_version()
    parsed = _parse(version)
    in_range = bool(parsed) and _MIN <= parsed[:2] < _MAX_EXCL
    if not in_range:
        if os.environ.get(_ENV_ALLOW, "") not in ("", "0"):
            warnings.warn(
                f"PEFT {version} is outside the range tera_tn.peft is tested with ({SUPPORTED_PEFT}); "
                f"continuing because {_ENV_ALLOW} is set",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            raise _fail(f"version {version} is outside the tested range (set {_ENV_ALLOW}=1 to try anyway)")
    missing = []
    try:
        from peft.utils.peft_types import PeftType

        for attr in ("_member_map_", "_value2member_map_", "_member_names_"):
            if not hasattr(PeftType, attr):
                missing.append(f"PeftType.{attr}")
        if not issubclass(PeftType, str):
            missing.append("PeftType as a str enum")
    except ImportError:
        missing.append("peft.utils.peft_types.PeftType")
    try:
        import peft.mapping as mapping

        for attr in (
            "PEFT_TYPE_TO_CONFIG_MAPPING",
            "PEFT_TYPE_TO_TUNER_MAPPING",
            "PEFT_TYPE_TO_PREFIX_MAPPING",
        ):
            if not isinstance(getattr(mapping, attr, None), dict):
                missing.append(f"peft.mapping.{attr}")
    except ImportError:
        missing.append("peft.mapping")
    try:
        from peft.utils import register_peft_method  # noqa: F401
    except ImportError:
        missing.append("peft.utils.register_peft_method")
    try:
        from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer  # noqa: F401

        for hook in ("_get_adapter_state_dict", "_remap_adapter_state_dict_for_load", "_remove_adapter_name_from_key"):
            if not hasattr(BaseTuner, hook):
                missing.append(f"BaseTuner.{hook}")
    except ImportError:
        missing.append("peft.tuners.tuners_utils.BaseTuner")
    if missing:
        raise _fail("its internals differ (missing: " + ", ".join(missing) + ")")


def extend_peft_type(name: str = PEFT_TYPE_NAME):
    """Add ``PeftType.<name>`` (value ``name``) if absent and return the member (idempotent)."""
    from peft.utils.peft_types import PeftType

    existing = PeftType.__members__.get(name)
    if existing is not None:
        return existing
    if name in PeftType._value2member_map_:
        raise _fail(f"PeftType already has a member with value {name!r} under another name")
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    if hasattr(next(iter(PeftType)), "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    member.__init__(name)
    # Class attribute first: EnumType.__setattr__ refuses names already in _member_map_.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    names = PeftType._member_names_
    if isinstance(names, list):
        names.append(name)
    else:  # pragma: no cover - some Python versions keep a dict-like view
        PeftType._member_names_ = type(names)(list(names) + [name]) if not isinstance(names, dict) else {**names, name: None}
    if PeftType(name) is not member or getattr(PeftType, name) is not member or name not in list(PeftType):
        raise _fail(f"extending the PeftType enum with {name!r} did not take effect on this Python/PEFT")
    return member
