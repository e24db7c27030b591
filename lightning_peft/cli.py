"""``lightning-peft fit|validate|test|predict --config recipe.yaml``: a LightningCLI with every PEFT callback.

``lightning-peft zoo ...`` goes to :mod:`lightning_peft.zoo.cli` instead, dispatched before Lightning
and the callbacks are imported (so ``lightning-peft zoo list`` starts in the time the zoo alone needs):
this module imports the training stack only when :class:`PeftCLI` or :func:`build_cli` is used.

The parser runs in jsonargparse's ``omegaconf`` mode, so a recipe can reuse a value with
``${...}`` interpolation (one rank figure for several callbacks, output paths derived from a run
name). lightning-peft callbacks are known by their short names (``class_path: LoRA``). The current
directory is importable, so a recipe may name your own ``my_module.MyLightningModule``.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

ZOO_HELP = (
    "lightning-peft zoo {list,search,info,download,export,push,rm}: the adapter zoo (local folder or the "
    "Hugging Face Hub); lightning-peft zoo --help for its commands.\n"
    "lightning-peft export RESULT --base BASE --out DIR: merge a result into its base model, saved in its own format.\n"
    "lightning-peft {fit,validate,test,predict} --config recipe.yaml: train with a LightningCLI recipe (below)."
)

__all__ = ["PeftCLI", "build_cli", "main"]  # noqa: F822 - PeftCLI is defined on first use (module __getattr__)


@functools.cache
def _peft_cli() -> type[LightningCLI]:
    """Define :class:`PeftCLI` (importing Lightning and registering the callbacks' short names) on first use."""
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.utilities import rank_zero_info

    import lightning_peft.callbacks  # noqa: F401  (registers the callbacks' short names)

    class PeftCLI(LightningCLI):
        """LightningCLI that reports the final metrics of a fit (e.g. validation accuracy) in one line."""

        def after_fit(self) -> None:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(("val", "test"))}
            if metrics:
                rank_zero_info("final metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))

    PeftCLI.__module__, PeftCLI.__qualname__ = __name__, "PeftCLI"
    return PeftCLI


def __getattr__(name: str) -> Any:
    if name == "PeftCLI":
        return _peft_cli()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Parse ``args`` (default ``sys.argv[1:]``) and, with ``run``, run the subcommand; returns the :class:`PeftCLI`.

    With ``run=False`` the arguments are the config only (no subcommand), and the trainer, model and
    data module are built but nothing runs: what the tests use to check that a recipe parses.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    kwargs: dict[str, Any] = {"parser_mode": "omegaconf"}
    return _peft_cli()(parser_kwargs=kwargs, save_config_kwargs={"overwrite": True}, args=args, run=run)


def main() -> None:
    """Entry point of the ``lightning-peft`` console script: ``zoo ...`` or a LightningCLI subcommand."""
    if sys.argv[1:2] in (["zoo"], ["export"]):  # before anything imports Lightning
        from lightning_peft.zoo.cli import main as zoo_main

        sys.exit(zoo_main(sys.argv[2:] if sys.argv[1] == "zoo" else sys.argv[1:]))  # export == zoo export
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(ZOO_HELP)
    build_cli()
    from lightning_peft import distributed

    distributed.shutdown()  # after a multi-process fit that succeeded (an error raised past here)


if __name__ == "__main__":  # pragma: no cover
    main()
