"""TeRA as a Hugging Face PEFT method.

Importing this package registers TeRA with the installed PEFT (``PeftType.TERA``, prefix
``"tera_"``), after which the usual PEFT API works::

    from peft import get_peft_model, PeftModel
    from tera_tn.peft import TeraConfig

    model = get_peft_model(base, TeraConfig(target_modules=["query", "value"], order=4, seed=0))
    model.print_trainable_parameters()
    model.save_pretrained("out")                      # or save_adapter(model, "out") (no overwrite)
    model = PeftModel.from_pretrained(base, "out")    # in a fresh process: import tera_tn.peft first
    merged = model.merge_and_unload()

PEFT's ``register_peft_method`` only accepts names already in its ``PeftType`` enum, so the member
``TERA`` is added to that enum first (see :mod:`tera_tn.peft.compat`); both steps are idempotent
and guarded by a PEFT version/internals check that raises :class:`IncompatiblePeftError` naming
the installed and the supported versions. See ``docs/peft.md``.
"""

from __future__ import annotations

from .compat import IncompatiblePeftError, check_peft, extend_peft_type, peft_version

check_peft()
extend_peft_type()

from .config import TeraConfig  # noqa: E402
from .export import export_lora  # noqa: E402
from .io import save_adapter  # noqa: E402
from .model import TeraAdapterMismatch, TeraModel  # noqa: E402
from .store import AdapterStore  # noqa: E402


def register() -> None:
    """Register TeRA with PEFT (done at import; calling it again is a no-op)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType, register_peft_method

    peft_type = PeftType.TERA
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if config_cls is TeraConfig and PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is TeraModel:
        return
    if config_cls is not None or peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        other = config_cls or PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
        if getattr(other, "__module__", "").startswith("tera_tn.peft"):
            # tera_tn.peft was re-imported (e.g. importlib.reload): point PEFT at the new classes.
            PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = TeraConfig
            PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = TeraModel
            PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = TeraModel.prefix
            return
        raise IncompatiblePeftError(
            f"PEFT already has a method registered as {peft_type.value!r} ({other!r}); "
            f"tera_tn.peft cannot register TeRA under that name (PEFT {peft_version()})"
        )
    register_peft_method(name="tera", config_cls=TeraConfig, model_cls=TeraModel, prefix=TeraModel.prefix)


register()

__all__ = [
    "AdapterStore",
    "TeraConfig",
    "TeraModel",
    "TeraAdapterMismatch",
    "save_adapter",
    "export_lora",
    "IncompatiblePeftError",
]
