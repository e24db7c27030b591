"""The standard library's docstrings as offline text: which objects of a module are documented, and the corpus.

:func:`documented_objects` is the one walk over a module's public, module-owned objects; the language-model corpus
(:func:`docstring_corpus`, :mod:`lightning_peft.tasks.language_model`) reads their docstrings whole, and the
word-order task (:mod:`lightning_peft.tasks.word_order`) adds the classes' public methods and splits the prose into
sentences.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

__all__ = ["DEFAULT_DOC_MODULES", "docstring_corpus", "documented_objects"]

DEFAULT_DOC_MODULES = (
    "textwrap",
    "string",
    "functools",
    "itertools",
    "collections",
    "json",
    "csv",
    "argparse",
    "pathlib",
    "shutil",
    "random",
    "statistics",
    "fractions",
    "decimal",
    "heapq",
    "bisect",
    "datetime",
    "calendar",
    "logging",
    "unittest",
    "difflib",
    "inspect",
    "typing",
    "dataclasses",
    "enum",
    "contextlib",
    "abc",
    "operator",
    "copy",
    "pprint",
)
"""Standard-library modules whose docstrings make the default corpus (about 190 kB of English and code)."""


def documented_objects(module: Any, methods: bool = False) -> list[Any]:
    """``module`` and its public classes and functions (those whose ``__module__`` is ``module``), in sorted order.

    Args:
        module: an imported module.
        methods: also list each such class's public callables (from its own ``vars``, sorted) right after it.

    Returns:
        The objects, ``module`` first; the same list for a given Python.

    Example:
        >>> import textwrap
        >>> documented_objects(textwrap)[0] is textwrap
        True
    """
    objects: list[Any] = [module]
    for name in sorted(dir(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        objects.append(obj)
        if methods and inspect.isclass(obj):
            objects.extend(v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and callable(v))
    return objects


def docstring_corpus(modules: list[str] | tuple[str, ...] = DEFAULT_DOC_MODULES) -> str:
    """The docstrings of ``modules`` and of their public classes and functions, in a fixed order.

    Args:
        modules: importable module names, e.g. ``["json", "textwrap"]``.

    Returns:
        The docstrings (``inspect.getdoc``, so dedented) joined by blank lines; the same for a given Python.

    Example:
        >>> docstring_corpus(["textwrap"]).startswith("Text wrapping and filling.")
        True
    """
    parts: list[str] = []
    for name in modules:
        objects = documented_objects(importlib.import_module(name))
        parts.extend(doc for doc in map(inspect.getdoc, objects) if doc)
    return "\n\n".join(parts)
