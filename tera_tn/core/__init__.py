"""The math objects: layer specs and their mode factorizations (``spec``, ``factorize``), C-order
tensorization (``tensorize``), the frozen factor recipe (``factors``), the mode-product kernel
(``modeproduct``) and the Tucker network that ΔW is (``network``). This is the ground floor of
tera_tn: modules here import only each other and the top-level leaves (``tera_tn.backends``,
``tera_tn.checks``), never ``tera_tn.contract``, ``tera_tn.analysis``, ``tera_tn.torch`` or
``tera_tn.peft``."""
