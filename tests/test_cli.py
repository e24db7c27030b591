"""Every YAML in examples/ and zoo/ is parsed by the real LightningCLI; the quickstart runs a few steps."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_peft import LoRA
from lightning_peft.callbacks import MethodCallback
from lightning_peft.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in [*ROOT.glob("examples/**/*.yaml"), *ROOT.glob("zoo/**/*.yaml")] if p.name != "index.yaml")


def test_there_are_recipes() -> None:
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


def test_zoo_index_lists_every_recipe() -> None:
    import yaml

    index = yaml.safe_load((ROOT / "zoo" / "index.yaml").read_text())
    listed = {e["recipe"] for e in index["entries"]}
    on_disk = {p.name for p in (ROOT / "zoo").glob("*.yaml") if p.name != "index.yaml"}
    assert listed == on_disk
    for entry in index["entries"]:  # each recipe publishes under the name the index gives
        assert f"name: {entry['name']}" in (ROOT / "zoo" / entry["recipe"]).read_text()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_parses_and_instantiates(recipe: Path, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(recipe), "--trainer.logger", "false"], run=False)
    assert any(isinstance(cb, MethodCallback) for cb in cli.trainer.callbacks) or recipe.parent.name == "zoo"


def readme_quickstart_lines() -> list[str]:
    """The output lines the README quotes after "It ends with" (the quickstart's last lines)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("It ends with", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines() if line.strip()]


def line_pattern(line: str) -> re.Pattern:
    """A README output line as a pattern: numbers, hex revisions and elided paths (…) vary from run to run."""
    out = ""
    for token in re.split(r"(\S*…\S*|\b[0-9a-f]{12}\b|\d+(?:\.\d+)?)", line):
        if not token:
            continue
        if "…" in token:
            out += r"\S+"
        elif re.fullmatch(r"[0-9a-f]{12}", token):
            out += "[0-9a-f]+"
        elif re.fullmatch(r"\d+(?:\.\d+)?", token):
            out += r"\d+(?:\.\d+)?"
        else:
            out += re.escape(token)
    return re.compile(out)


def test_quickstart_runs_with_interpolated_paths(monkeypatch, tmp_path, caplog) -> None:
    from transformers import BertModel

    caplog.set_level(logging.INFO)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIGHTNING_PEFT_ZOO", str(tmp_path / "zoo"))
    # a 2-step run: the recipe's 12 warm-up + 31 final AdaLoRA steps would not fit (that is an error)
    recipe = (ROOT / "examples/quickstart.yaml").read_text()
    assert "tinit: 12" in recipe and "tfinal: 31" in recipe
    (tmp_path / "quick.yaml").write_text(recipe.replace("tinit: 12", "tinit: 0").replace("tfinal: 31", "tfinal: 1"))
    args = ["fit", "--config", str(tmp_path / "quick.yaml"), "--trainer.max_epochs", "1"]
    args += ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.check_val_every_n_epoch", "1"]
    args += ["--data.init_args.train_size", "64", "--data.init_args.val_size", "64"]
    cli = build_cli(args)
    lora = next(cb for cb in cli.trainer.callbacks if isinstance(cb, LoRA))
    # save_dir is ${trainer.default_root_dir}/adapter in the recipe: omegaconf interpolation resolved it
    # (within the file: jsonargparse resolves a config file's interpolations when it loads that file)
    assert lora.save_dir == "runs/quickstart/adapter"
    assert (tmp_path / "runs/quickstart/adapter/adapter_model.safetensors").is_file()
    assert (tmp_path / "runs/quickstart/adapter/adalora_ranks.png").is_file()
    # the save_dir is a zoo entry too, with the recipe that produced it (zoo push publishes it)
    assert "tinit: 0" in (tmp_path / "runs/quickstart/adapter/config.yaml").read_text()
    assert (tmp_path / "runs/quickstart/adapter/lightning_peft.json").is_file()
    assert cli.trainer.global_step == 2 and {"val_acc", "val_acc_head_only"} <= set(cli.trainer.callback_metrics)
    assert isinstance(cli.model.model.encoder, BertModel)  # the real pretrained MiniLM, not a stand-in
    # ... and published it to the local zoo, with the recipe, the picture and the metrics
    from lightning_peft.zoo import LocalZoo

    (entry,) = LocalZoo(tmp_path / "zoo").list()
    assert entry.name == "quickstart-minilm-word-order-adalora" and entry.method == "adalora"
    assert {"val_acc", "val_acc_head_only"} <= set(entry.metrics)
    files = {p.name for p in Path(entry.location).iterdir()}
    assert {"config.yaml", "adalora_ranks.png", "README.md", "lightning_peft.json"} <= files
    # the README's quoted output is what the quickstart prints (numbers and paths aside)
    printed = [r.getMessage() for r in caplog.records]
    quoted = readme_quickstart_lines()
    assert len(quoted) >= 4
    for line in quoted:
        assert any(line_pattern(line).search(p) for p in printed), f"README quotes {line!r}; the run printed {printed}"


def test_the_readmes_list_every_example_recipe() -> None:
    recipes = sorted(p.name for p in (ROOT / "examples").glob("*.yaml"))
    listing = (ROOT / "examples" / "README.md").read_text()
    assert [r for r in recipes if f"]({r})" not in listing] == []  # each one linked from examples/README.md
    layout = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("examples/ "))
    assert f"({len(recipes)};" in layout, f"README's layout says {layout!r}; there are {len(recipes)} recipes"


def test_console_script_help() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "lightning_peft.cli", "fit", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--trainer.callbacks" in out.stdout


def test_top_level_help_names_the_zoo() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "lightning_peft.cli", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lightning-peft zoo" in out.stdout and "fit" in out.stdout
