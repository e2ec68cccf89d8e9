"""The PEFT adapter's description, sized from specs alone (the report uses it).

Kept as the import path of :func:`adapter_signature` and :func:`signature_bytes`; the format
itself, its version and its reader live in :mod:`tera_tn.core.adapter_format`.
"""

from __future__ import annotations

from .adapter_format import adapter_signature, spec_groups
from .adapter_format import encode as signature_bytes

__all__ = ["adapter_signature", "signature_bytes", "spec_groups"]
