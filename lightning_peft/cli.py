"""``lightning-peft fit|validate|test|predict --config recipe.yaml``: a LightningCLI with every PEFT callback.

``lightning-peft zoo ...`` goes to :mod:`lightning_peft.zoo.cli` instead.

The parser runs in jsonargparse's ``omegaconf`` mode, so a recipe can reuse a value with
``${...}`` interpolation (one rank figure for several callbacks, output paths derived from a run
name). lightning-peft callbacks are known by their short names (``class_path: LoRA``). The current
directory is importable, so a recipe may name your own ``my_module.MyLightningModule``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

import lightning_peft.callbacks  # noqa: F401  (registers the callbacks' short names)

__all__ = ["PeftCLI", "build_cli", "main"]


class PeftCLI(LightningCLI):
    """LightningCLI that reports the final metrics of a fit (e.g. validation accuracy) in one line."""

    def after_fit(self) -> None:
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(("val", "test"))}
        if metrics:
            rank_zero_info("final metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))


def build_cli(args: list[str] | None = None, run: bool = True) -> PeftCLI:
    """Parse ``args`` (default ``sys.argv[1:]``) and, with ``run``, execute the subcommand; returns the CLI.

    With ``run=False`` the arguments are the config only (no subcommand), and the trainer, model and
    data module are built but nothing runs: what the tests use to check that a recipe parses.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    kwargs: dict[str, Any] = {"parser_mode": "omegaconf"}
    return PeftCLI(parser_kwargs=kwargs, save_config_kwargs={"overwrite": True}, args=args, run=run)


def main() -> None:
    """Entry point of the ``lightning-peft`` console script: ``zoo ...`` or a LightningCLI subcommand."""
    if sys.argv[1:2] == ["zoo"]:
        from lightning_peft.zoo.cli import main as zoo_main

        sys.exit(zoo_main(sys.argv[2:]))
    build_cli()


if __name__ == "__main__":  # pragma: no cover
    main()
