"""Contracting a TeRA network with an input: the calibrated roofline cost model (``costmodel``, a
leaf that imports nothing from the planner) and the planner plus apply (``contraction``), which
prices materializing ΔW against contracting factor by factor. Modules here may import
``tera_tn.core`` and the top-level leaves, never ``tera_tn.analysis``, ``tera_tn.torch`` or
``tera_tn.peft``."""
