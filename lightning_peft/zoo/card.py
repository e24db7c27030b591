"""The model card (``README.md``) of a zoo entry, from data: ``huggingface_hub.ModelCard`` + ``ModelCardData``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["write_card"]


def write_card(
    folder: Path,
    name: str,
    method: str,
    base_model: str | None,
    metrics: dict[str, float],
    hyperparameters: dict[str, Any],
    pictures: list[str],
    schedule: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder/README.md`` with YAML metadata (``library_name``, ``base_model``, tags, metrics) and a summary.

    A ``schedule`` with ``finished: False`` (a run stopped before its method's schedule ended) is said at the top.
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
```python
from lightning_peft import zoo
zoo.load(model, "{name}")   # checks the base model's fingerprint, injects the adapters, loads the weights
```

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
