"""Experiments that use tera_tn but are not part of the installed package (run from the repo root)."""
