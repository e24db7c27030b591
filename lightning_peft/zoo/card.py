"""The model card (``README.md``) of a zoo entry, from data: ``huggingface_hub.ModelCard`` + ``ModelCardData``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["loaders", "write_card"]


def write_card(
    folder: Path,
    name: str,
    method: str,
    base_model: str | None,
    metrics: dict[str, float],
    hyperparameters: dict[str, Any],
    pictures: list[str],
    schedule: dict[str, Any] | None = None,
    base_class: str | None = None,
) -> Path:
    """Write ``folder/README.md`` with YAML metadata (``library_name``, ``base_model``, tags, metrics) and a summary.

    A ``schedule`` with ``finished: False`` (a run stopped before its method's schedule ended) is said at the top.
    The "Load it" section lists the loaders that read the entry (:func:`loaders`), from the adapter files already in
    ``folder`` and the base model's class.
    """
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="lightning-peft",
        base_model=base_model,
        tags=["lightning-peft", method, "peft"],
        model_name=name,
        metrics=sorted(metrics) or None,
        lightning_peft={"method": method, "metrics": {k: round(float(v), 6) for k, v in metrics.items()}},
    )
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())) or "| - | - |"
    params = ", ".join(f"`{k}={v}`" for k, v in hyperparameters.items() if v not in (None, [], {}))
    images = "\n".join(f"![{p}]({p})" for p in pictures)
    unfinished = ""
    if schedule and schedule.get("finished") is False:
        unfinished = (
            f"\n> **The training stopped before the {method} schedule finished** (step {schedule.get('stopped_at')} "
            f"of {schedule.get('planned_steps')}): {schedule.get('note', 'the result is mid-schedule')}.\n"
        )
    text = f"""---
{data.to_yaml()}
---

# {name}

A **{method}** adapter trained with [lightning-peft](https://pypi.org/project/lightning-peft/)
on `{base_model or "an unnamed base model"}`.
{unfinished}
## Load it

{loaders(folder, name, base_class)}

## Metrics

| metric | value |
|---|---:|
{rows}

## Hyper-parameters

{params}

{images}
"""
    path = folder / "README.md"
    ModelCard(text).save(path)
    return path


def loaders(folder: Path, name: str, base_class: str | None = None) -> str:
    """Markdown: each loader that reads the entry in ``folder``, how, and what it needs installed.

    Every entry loads with ``zoo.load`` and exports merged (``lightning-peft zoo export``) to its family's own
    ``from_pretrained``; a LoRA/AdaLoRA entry is a peft adapter as it is, a UNet's LoRA also exports for a diffusers
    pipeline's ``load_lora_weights``, and a sparse result (ID³, SaRA) exports as a peft SHiRA adapter.
    """
    from lightning_peft.adapters.serialization import ADAPTER_CONFIG, read_json

    file = folder / ADAPTER_CONFIG
    config = read_json(file) if file.is_file() else {}
    base = "BASE"  # a local model folder, a Hub id or timm:NAME
    lines = [
        "```python",
        "from lightning_peft import zoo",
        f'zoo.load(model, "{name}")   # checks the base model\'s fingerprint, then loads the result onto it',
        "```",
        "",
        "| with | how |",
        "|---|---|",
        f'| lightning-peft | `zoo.load(model, "{name}")` (above) |',
        f"| the base model's own library, merged (no lightning-peft needed to read it) | "
        f"`lightning-peft zoo export {name} --base {base} --out DIR`, then `<ModelClass>.from_pretrained(DIR)` "
        "(timm: `timm.create_model('local-dir:DIR', pretrained=True)`) |",
    ]
    if config.get("peft_type") in ("LORA", "ADALORA"):
        lines.append(
            f"| peft | `PeftModel.from_pretrained(base_model, FOLDER)`: FOLDER is this entry's folder "
            f'(`zoo.download("{name}")`) or its Hub repo id; the entry is a peft adapter as it is |'
        )
        if base_class == "UNet2DConditionModel":
            lines.append(
                f"| a diffusers pipeline | `lightning-peft zoo export {name} --base {base} --out DIR --format "
                "diffusers-lora`, then `pipe.load_lora_weights(DIR)` |"
            )
    elif config.get("delta_format") == "sparse":
        lines.append(
            f"| peft (SHiRA, Linear layers; other changed modules saved whole) | `lightning-peft zoo export {name} "
            f"--base {base} --out DIR --format peft-shira`, then `PeftModel.from_pretrained(base_model, DIR)` |"
        )
    return "\n".join(lines)
