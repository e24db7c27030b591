"""Pure-torch adapter layers and their plumbing: target matching, injection, merge, save/load.

Nothing here imports Lightning; everything works on a bare ``nn.Module``.

Example:
    >>> from torch import nn
    >>> from lightning_peft.adapters import LoRAConfig, inject_adapters, count_parameters
    >>> net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> inject_adapters(net, LoRAConfig(r=2, target_modules=["0", "2"]))
    ['0', '2']
    >>> count_parameters(net)
    (100, 406)
"""

from lightning_peft.adapters.inject import (
    adapter_layers,
    count_parameters,
    disable_adapters,
    inject_adapters,
    mark_trainable,
    merge_adapters,
    remove_adapters,
    set_adapters_enabled,
    unmerge_adapters,
)
from lightning_peft.adapters.lora import LoRAConfig, LoRALayer
from lightning_peft.adapters.serialization import (
    AdapterMismatchError,
    adapter_state_dict,
    load_adapter,
    peft_config,
    read_adapter_config,
    save_adapter,
    write_adapter,
)
from lightning_peft.adapters.svd import AdaLoRAConfig, SVDLoRALayer
from lightning_peft.adapters.targeting import TargetMatch, TargetNotFoundError, dry_run, match_targets

__all__ = [
    "AdaLoRAConfig",
    "AdapterMismatchError",
    "LoRAConfig",
    "LoRALayer",
    "SVDLoRALayer",
    "TargetMatch",
    "TargetNotFoundError",
    "adapter_layers",
    "adapter_state_dict",
    "count_parameters",
    "disable_adapters",
    "dry_run",
    "inject_adapters",
    "load_adapter",
    "mark_trainable",
    "match_targets",
    "merge_adapters",
    "peft_config",
    "read_adapter_config",
    "remove_adapters",
    "save_adapter",
    "set_adapters_enabled",
    "unmerge_adapters",
    "write_adapter",
]
