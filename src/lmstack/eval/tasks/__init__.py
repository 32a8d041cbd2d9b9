"""Built-in tasks: importing this package imports every task module in it, so each registers its tasks.

Each module registers its tasks with @register_task on import. Modules are found by listing this package,
so a new task file needs no edit here. A module whose optional dependency is missing is skipped, with the
reason kept in SKIPPED; any other import error surfaces.

Usage:
    from lmstack.eval.task import list_tasks
    list_tasks()    # ['arc_challenge', 'arc_easy', 'gsm8k', 'hellaswag', ...]
"""
from __future__ import annotations

import importlib
import pkgutil

SKIPPED: dict[str, str] = {}
"""module name -> why it was not imported (a third-party package it needs is not installed)."""

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _full = f"{__name__}.{_info.name}"
    try:
        importlib.import_module(_full)
    except ModuleNotFoundError as e:
        # A missing third-party package skips the module; a missing lmstack module is a real bug.
        if e.name is None or e.name.startswith("lmstack"):
            raise
        SKIPPED[_info.name] = f"needs the package {e.name!r}"
