"""Reading a TeRA network rather than running it: numerical and structured rank (``rank``,
``spectrum``), peer methods' parameter counts (``accounting``), built-in model layer shapes
(``shapes``), and the reports and figures built from them (``report``, ``plot``). The top floor of
the math: modules here may import ``tera_tn.core``, ``tera_tn.contract`` and the top-level leaves,
and only the package face (``tera_tn``), the CLI and users import them."""
