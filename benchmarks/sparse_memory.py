"""Sparse methods' memory and speed: ID³ (issue #5) on a Llama causal LM, SaRA (issue #6) on a diffusion UNet.

Not a test (STYLE.md item 13). Plain PyTorch training loops (no Lightning) with AdamW everywhere, built
from the library's pure-torch pieces exactly as the callbacks drive them; every configuration runs in
its own fresh worker process (``harness.run_worker``). Models are built from
configs with random weights (nothing is downloaded).

**Part A, ID³** (``lightning_peft.callbacks.ID3``): a transformers ``LlamaForCausalLM`` (default hidden
256, 8 layers, intermediate 688, 4 heads, vocab 2048) on random tokens (batch 8 x 128, causal-LM loss);
the targets are the 7 projections of every layer.

* ``full``: every parameter trainable;
* ``lora``: :func:`lightning_peft.adapters.inject_adapters`, r=8, alpha=16, on the targets;
* ``id3``: :func:`~lightning_peft.adapters.sparse.inject_sparse` on the target weights with a bank of
  ``B`` = LoRA r=8's trainable parameter count, :class:`~lightning_peft.methods.id3.Unmasker` with
  ``T`` = warm-up + measured steps (every measured step unmasks), scored in the layers' ``grad_hook``
  during backward; the new entries get their gradient before ``AdamW.step`` (as ``ID3`` does in
  ``on_train_batch_start`` / ``on_before_optimizer_step``);
* ``id3_steady``: the same with ``T`` = ``--id3-steady-t`` (2): unmasking ends in the untimed steps,
  the measured steps are the steady state (O(B) backward, no scoring);
* ``id3_masked``: the reference's approach: the target weights as dense trainable parameters under a
  dense AdamW, a boolean mask per tensor, gradients multiplied by the mask after backward; unmasking
  by the same score through a model-sized concatenated top-k.

**Part B, SaRA** (``lightning_peft.callbacks.SaRA``): a diffusers ``UNet2DConditionModel`` (default
sample 32, channels 64/128/256, 2 layers per block, cross-attention dim 128, batch 4, text conditioning
4 x 8 x 128) trained on the DDPM epsilon loss (``DDPMScheduler.add_noise``).

* ``full``: every parameter trainable;
* ``lora``: our LoRA r=8 on the UNet preset targets (``to_q``, ``to_k``, ``to_v``, ``to_out.0``);
* ``sara``: the sparse core on the preset targets' weights, the smallest 10 % of each by ``|w|``
  (:class:`~lightning_peft.methods.sara.SaRASelector`), nuclear-norm penalty λ=5e-4 on one matrix per
  step added to the bank's gradient (as ``SaRA.add_penalty_grad``);
* ``sara_masked``: the reference-like approach: the same target weights as dense trainable parameters,
  gradients multiplied by a 0/1 (bool) mask after backward, dense AdamW, the same penalty on one matrix;
* ``sara_all``: the sparse core on every ``nn.Conv2d`` and ``nn.Linear`` weight of the UNet, 10 %.

Per configuration: median training-step time (forward + loss + backward + the method's work + AdamW
step + ``zero_grad``) over ``--steps`` steps after ``--warmup``, with the forward / backward /
method / optimizer phases; parameters given to the optimizer and entries trained at the end; bytes of
the tensors in ``optimizer.state`` after the last step; peak memory.

Peak memory on CPU is the process's RSS high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` right before the model is built), reported raw and as growth over the RSS
at that moment (the comparable figure: imports excluded). It is measured in a second fresh process
per configuration (``--memory-steps`` steps after one warm-up; ``id3``: all its ``T`` steps, so that
its bookkeeping reaches the full budget) run with ``MALLOC_MMAP_THRESHOLD_=65536``: with glibc's
default, *dynamic* mmap threshold (raised up to 32 MiB each time a large block is freed) freed tensors
of a few MiB stay in the heap, and the RSS peak says more about fragmentation than about live tensors
(on the default Llama, LoRA's peak growth came out at 443 and 463 MiB in two runs, full fine-tuning's
at 450 and 448 MiB, against 238 vs 304 MiB with the fixed threshold). The fixed threshold costs page
faults on every large allocation, so the timing runs keep glibc's default; their growth is shown in
the last column. On CUDA the figure
is ``torch.cuda.max_memory_allocated`` (reset before the model is built) and its growth, from the
timing run. The peak of the timed steps alone is reported too (the high-water mark is reset again
before the first timed step; for ``id3_steady`` that leaves out the unmasking steps).

Goals, printed PASS/MISS against figures of the same run: ID³'s AdamW state over the dense AdamW state
of the target weights equals the budget fraction; ID³ peak <= 0.7 x full FT peak; ID³ step <= 1.3 x
full FT step; SaRA peak <= 0.7 x full FT peak; SaRA step <= 1.3 x full FT step.

    python benchmarks/sparse_memory.py                                  # ~6-7 min on 2 idle CPU cores
    python benchmarks/sparse_memory.py --tiny --steps 2 --warmup 1      # smoke check, about a minute
    python benchmarks/sparse_memory.py --parts llama --configs full,id3
    python benchmarks/sparse_memory.py --device cuda --markdown sparse_memory.md
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import llama_config, record  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from harness import (  # noqa: E402
    PeakMemory,
    Report,
    StepTimer,
    add_common_args,
    markdown_table,
    measure_each,
    measure_steps,
    mib,
    ms,
    optimizer_state_bytes,
    others_cell,
    parse_args,
    ratio,
    run_worker,
    verdict,
)
from torch import nn  # noqa: E402

PARTS = ("llama", "unet")
CONFIGS: dict[str, tuple[str, ...]] = {
    "llama": ("full", "lora", "id3", "id3_steady", "id3_masked", "floor"),
    "unet": ("full", "lora", "sara", "sara_masked", "sara_all", "floor"),
}
LABELS = {
    "full": "full FT",
    "lora": "our LoRA r=8",
    "id3": "ID³ (unmasking every step)",
    "id3_steady": "ID³ (after unmasking)",
    "id3_masked": "ID³ reference-like (dense AdamW, masked grads)",
    "sara": "SaRA 10 %, sparse core",
    "sara_masked": "SaRA 10 %, reference-like (dense AdamW, masked grads)",
    "sara_all": "SaRA 10 % of all conv + linear, sparse core",
    "floor": "floor: frozen model, backward to the input only",
}
N_BATCHES = 4  # distinct input batches, cycled through the steps
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# goals of issues #5 and #6
PEAK_GOAL = 0.7
STEP_GOAL = 1.3
STATE_TOLERANCE = 0.01  # |(state ratio) / (budget fraction) - 1|


# ----------------------------------------------------------------------------------------------- models and data


def unet_blocks(channels: tuple[int, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    n = len(channels)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return down, up


def build_model(part: str, args: argparse.Namespace) -> nn.Module:
    """The backbone with deterministic random weights (same seed -> same weights in every process)."""
    torch.manual_seed(args.seed)
    if part == "llama":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(llama_config(vars(args)))
    from diffusers import UNet2DConditionModel

    down, up = unet_blocks(args.unet_channels)
    return UNet2DConditionModel(
        sample_size=args.unet_sample,
        in_channels=4,
        out_channels=4,
        block_out_channels=args.unet_channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=args.unet_layers,
        cross_attention_dim=args.unet_cross,
        norm_num_groups=min(32, min(args.unet_channels)),
    )


def make_batches(part: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for _ in range(N_BATCHES):
        if part == "llama":
            ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
            batches.append({"ids": ids.to(device)})
        else:
            b, s = args.unet_batch, args.unet_sample
            batch = {
                "latents": torch.randn(b, 4, s, s, generator=gen),
                "noise": torch.randn(b, 4, s, s, generator=gen),
                "t": torch.randint(0, 1000, (b,), generator=gen),
                "text": torch.randn(b, args.unet_text_len, args.unet_cross, generator=gen),
            }
            batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


class Loss:
    """The training loss of a part: causal-LM cross-entropy, or the DDPM epsilon MSE."""

    def __init__(self, part: str) -> None:
        self.part = part
        if part == "unet":
            from diffusers import DDPMScheduler

            self.scheduler = DDPMScheduler(num_train_timesteps=1000)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.part == "llama":
            return model(input_ids=batch["ids"], labels=batch["ids"], use_cache=False).loss
        noisy = self.scheduler.add_noise(batch["latents"], batch["noise"], batch["t"])
        pred = model(noisy, batch["t"], encoder_hidden_states=batch["text"]).sample
        return nn.functional.mse_loss(pred, batch["noise"])


def preset_targets(model: nn.Module) -> list[str]:
    """Names of the modules the backbone preset targets (what the callbacks use by default)."""
    from lightning_peft.adapters.targeting import match_targets
    from lightning_peft.backbones import default_target_modules

    preset = default_target_modules(model)
    if not preset:
        raise RuntimeError(f"no preset target_modules for {type(model).__name__}")
    return list(match_targets(model, list(preset)).matched)


def all_conv_linear(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]


def lora_count(model: nn.Module, names: list[str], r: int) -> int:
    """Trainable parameters of LoRA rank ``r`` on the named linear layers: ``r * (in + out)`` each."""
    total = 0
    for name in names:
        m = model.get_submodule(name)
        total += r * (m.in_features + m.out_features)
    return total


# ----------------------------------------------------------------------------------------------- methods


class Method:
    """What a configuration does to the model and around ``backward`` (the callbacks' hooks, in a plain loop)."""

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    def params(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def before_forward(self, step: int) -> None:
        """``on_train_batch_start``."""

    def after_backward(self, step: int) -> None:
        """``on_before_optimizer_step``: gradients complete."""

    def trained_entries(self, params: list[nn.Parameter]) -> int:
        return sum(p.numel() for p in params)


class Full(Method):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        model.requires_grad_(True)


class LoRA(Method):
    def __init__(self, model: nn.Module, targets: list[str], args: argparse.Namespace) -> None:
        super().__init__()
        from lightning_peft.adapters import LoRAConfig, inject_adapters

        adapted = inject_adapters(model, LoRAConfig(r=args.r, alpha=args.alpha, target_modules=targets))
        self.info["layers"] = len(adapted)


class Floor(Method):
    """The floor of every method that trains something inside the network: the model frozen, one trained scalar on
    the first layer's output, so the backward runs through every block (keeping what input gradients need) but
    computes no weight gradient and the optimizer holds one number."""

    def __init__(self, model: nn.Module, part: str) -> None:
        super().__init__()
        model.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(()))
        first = model.model.embed_tokens if part == "llama" else model.conv_in
        first.register_forward_hook(lambda module, args, out: out * self.scale)

    def params(self, model: nn.Module) -> list[nn.Parameter]:
        return [self.scale]


class SparseBase(Method):
    """``inject_sparse`` on the targets' weights; the bank's ``values`` is the one trainable parameter."""

    def __init__(self, model: nn.Module, targets: list[str], capacity: int) -> None:
        super().__init__()
        from lightning_peft.adapters.sparse import inject_sparse, sparse_layers

        model.requires_grad_(False)
        self.bank = inject_sparse(model, {name: ("weight",) for name in targets}, capacity)
        self.bank.values.requires_grad_(True)
        self.layers = dict(sparse_layers(model))
        self.info["layers"] = len(self.layers)
        self.info["capacity"] = capacity
        self.info["target_numel"] = sum(layer.base_layer.weight.numel() for layer in self.layers.values())
        self.info["slow_path_layers"] = sum(layer._fast is None for layer in self.layers.values())  # functional_call

    def trained_entries(self, params: list[nn.Parameter]) -> int:
        return self.bank.used


class ID3Sparse(SparseBase):
    """What :class:`lightning_peft.callbacks.ID3` does, without Lightning (no accumulation, one process)."""

    def __init__(self, model: nn.Module, targets: list[str], budget: int, total_steps: int) -> None:
        super().__init__(model, targets, budget)
        from lightning_peft.methods.id3 import Unmasker

        self.unmasker = Unmasker(budget, total_steps, self.info["target_numel"], eps=1e-8, exp=1.0)
        self.keys = {id(layer): name for name, layer in self.layers.items()}
        self.armed = False
        self.info["total_steps"] = total_steps

    def _hook(self, layer: Any, name: str, grad: torch.Tensor) -> None:
        key = f"{self.keys[id(layer)]}:{name}"
        self.unmasker.observe(key, grad, layer.base_layer.get_parameter(name), layer.indices(name))

    def _set_hooks(self, on: bool) -> None:
        for layer in self.layers.values():
            layer.grad_hook = self._hook if on else None
        self.armed = on

    def before_forward(self, step: int) -> None:
        want = self.unmasker.wants_gradients(step)
        if want != self.armed:
            self._set_hooks(want)

    def after_backward(self, step: int) -> None:
        if not self.armed:
            return
        picks = self.unmasker.select(step)
        grads = self.unmasker.selected_grads
        values = self.bank.values
        if values.grad is None:
            values.grad = torch.zeros_like(values)
        for key, indices in picks.items():
            layer_name, pname = key.rsplit(":", 1)
            slots = self.layers[layer_name].add(pname, indices)
            values.grad[slots] = grads[key].to(values.grad)
        self._set_hooks(False)


class MaskedBase(Method):
    """The reference toolkits' way: target weights as dense trainable parameters, gradients masked after backward."""

    def __init__(self, model: nn.Module, targets: list[str]) -> None:
        super().__init__()
        model.requires_grad_(False)
        self.weights = [model.get_submodule(name).weight for name in targets]
        for w in self.weights:
            w.requires_grad_(True)
        self.masks = [torch.zeros_like(w, dtype=torch.bool) for w in self.weights]
        self.info["layers"] = len(self.weights)
        self.info["target_numel"] = sum(w.numel() for w in self.weights)

    def apply_masks(self) -> None:
        for w, m in zip(self.weights, self.masks, strict=True):
            if w.grad is not None:
                w.grad.mul_(m)

    def trained_entries(self, params: list[nn.Parameter]) -> int:
        return int(sum(int(m.sum()) for m in self.masks))


class ID3Masked(MaskedBase):
    """The reference's ID³: the same score over the dense ``.grad`` of every target, a model-sized global top-k."""

    def __init__(self, model: nn.Module, targets: list[str], budget: int, total_steps: int) -> None:
        super().__init__(model, targets)
        from lightning_peft.methods.id3 import Unmasker

        self.schedule = Unmasker(budget, total_steps, self.info["target_numel"])  # the same B // T schedule
        self.eps, self.exp = 1e-8, 1.0
        self.info["total_steps"] = total_steps

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        n = self.schedule.schedule(step)
        if n > 0:
            scores = torch.cat(
                [
                    (w.grad.abs() / (self.eps + w.abs()) ** self.exp).masked_fill_(m, -math.inf).reshape(-1)
                    for w, m in zip(self.weights, self.masks, strict=True)
                ]
            )
            chosen = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
            chosen[torch.topk(scores, n).indices] = True
            del scores
            for m, part in zip(self.masks, chosen.split([m.numel() for m in self.masks]), strict=True):
                m |= part.view_as(m)
        self.apply_masks()


class SaRAPenalty:
    """The nuclear-norm penalty's draw, as :class:`lightning_peft.callbacks.SaRA` configures it."""

    def __init__(self, fraction: float, lam: float) -> None:
        from lightning_peft.methods.sara import SaRASelector

        self.selector = SaRASelector(fraction=fraction, matrices=1, every=1, min_dim=1, seed=0)
        self.lam = lam


class SaRASparse(SparseBase):
    """What :class:`lightning_peft.callbacks.SaRA` does: select the smallest ``|w|``, penalise one matrix per step."""

    def __init__(self, model: nn.Module, targets: list[str], fraction: float, lam: float) -> None:
        self.pen = SaRAPenalty(fraction, lam)
        sel = self.pen.selector
        capacity = sum(sel.count(model.get_submodule(n).weight) for n in targets)
        super().__init__(model, targets, capacity)
        for layer in self.layers.values():  # SaRA._select_all (on_train_start)
            layer.add("weight", sel.select(layer.base_layer.weight, limit=self.bank.free))
        self.eligible = [
            (layer, "weight") for layer in self.layers.values() if sel.eligible(layer.base_layer.weight.shape)
        ]
        self.info["eligible"] = len(self.eligible)

    @torch.no_grad()
    def after_backward(self, step: int) -> None:  # SaRA.add_penalty_grad
        from lightning_peft.methods.sara import nuclear_norm_grad

        picks = self.pen.selector.penalty_matrices(step, len(self.eligible))
        if not picks or self.pen.lam == 0:
            return
        values = self.bank.values
        if values.grad is None:
            values.grad = torch.zeros_like(values)
        scale = len(self.eligible) / len(picks)
        for i in picks:
            layer, pname = self.eligible[i]
            weight = layer.base_layer.get_parameter(pname)
            indices, deltas = layer.delta(pname)
            delta = torch.zeros(weight.numel(), dtype=torch.float32, device=weight.device)
            delta[indices] = deltas
            _, grad = nuclear_norm_grad(delta.view(weight.shape))
            values.grad.index_add_(
                0,
                layer.active_slots(pname),
                (self.pen.lam * scale * grad.reshape(-1)[layer.active_indices(pname)]).to(values),
            )


class SaRAMasked(MaskedBase):
    """The reference-like SaRA: dense target weights, a fixed 0/1 mask on their gradients, dense AdamW."""

    def __init__(self, model: nn.Module, targets: list[str], fraction: float, lam: float) -> None:
        super().__init__(model, targets)
        self.pen = SaRAPenalty(fraction, lam)
        for w, m in zip(self.weights, self.masks, strict=True):
            m.view(-1)[self.pen.selector.select(w)] = True
        self.eligible = [i for i, w in enumerate(self.weights) if self.pen.selector.eligible(w.shape)]

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        from lightning_peft.methods.sara import nuclear_norm_grad

        self.apply_masks()
        picks = self.pen.selector.penalty_matrices(step, len(self.eligible))
        scale = len(self.eligible) / max(1, len(picks))
        for i in picks:  # the reference penalises W * M; the gradient goes to the masked entries
            w, m = self.weights[self.eligible[i]], self.masks[self.eligible[i]]
            _, grad = nuclear_norm_grad(w * m)
            w.grad.add_(grad.mul_(m).to(w.grad), alpha=self.pen.lam * scale)


def make_method(part: str, config: str, model: nn.Module, args: argparse.Namespace) -> Method:
    if config == "full":
        return Full(model)
    if config == "floor":
        return Floor(model, part)
    targets = preset_targets(model)
    if config == "lora":
        return LoRA(model, targets, args)
    if part == "llama":
        budget = lora_count(model, targets, args.r)
        if config == "id3":
            return ID3Sparse(model, targets, budget, args.id3_t)
        if config == "id3_steady":
            return ID3Sparse(model, targets, budget, args.id3_steady_t)
        if config == "id3_masked":
            return ID3Masked(model, targets, budget, args.id3_t)
    else:
        if config == "sara":
            return SaRASparse(model, targets, args.sara_fraction, args.sara_lambda)
        if config == "sara_masked":
            return SaRAMasked(model, targets, args.sara_fraction, args.sara_lambda)
        if config == "sara_all":
            return SaRASparse(model, all_conv_linear(model), args.sara_fraction, args.sara_lambda)
    raise ValueError(f"unknown configuration {part}:{config}")


# ----------------------------------------------------------------------------------------------- worker


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration (``args.part``, ``args.config``) in this fresh process."""
    part, config = args.part, args.config
    device = torch.device(args.device)
    # import everything the run needs before the memory baseline, so that imports do not count
    if part == "llama":
        import transformers.models.llama.modeling_llama  # noqa: F401
    else:
        import diffusers  # noqa: F401
        from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: F401
    import lightning_peft.adapters.sparse  # noqa: F401
    import lightning_peft.methods.id3  # noqa: F401
    import lightning_peft.methods.sara  # noqa: F401
    from lightning_peft.adapters import LoRAConfig, inject_adapters  # noqa: F401

    loss_fn = Loss(part)
    memory = PeakMemory(device).start()
    model = build_model(part, args).to(device)
    total_params = sum(p.numel() for p in model.parameters())
    method = make_method(part, config, model, args)
    params = method.params(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    batches = make_batches(part, args, device)
    model.train()

    def step(i: int, timer: StepTimer) -> torch.Tensor:
        batch = batches[i % len(batches)]
        method.before_forward(i)
        loss = loss_fn(model, batch)
        timer.lap("fwd")
        loss.backward()
        timer.lap("bwd")
        method.after_backward(i)
        timer.lap("method")
        opt.step()
        opt.zero_grad(set_to_none=True)
        timer.lap("opt")
        return loss.detach()

    untimed_peak = [0]

    def before_timed() -> None:  # from here on the peak of the timed steps only (the whole run's is kept too)
        untimed_peak[0] = memory.peak()
        memory.reset()

    untimed = args.warmup + (args.id3_steady_t if config == "id3_steady" else 0)
    timed = measure_steps(step, args.steps, untimed, device, before_timed=before_timed)
    timed_peak = memory.peak()
    whole = memory.figures(max(untimed_peak[0], timed_peak))
    return {
        "part": part,
        "config": config,
        "total": total_params,
        "trainable": sum(p.numel() for p in params),
        "trained_entries": method.trained_entries(params),
        "opt_state_bytes": optimizer_state_bytes(opt),
        **whole,
        "timed_peak_bytes": timed_peak,
        "timed_peak_growth_bytes": timed_peak - whole["mem_before_bytes"],
        **{k: timed[k] for k in ("step_s", "step_min_s", "step_max_s", "phases_s", "others_cpu_share")},
        "first_loss": timed["losses"][0],
        "last_loss": timed["losses"][-1],
        "threads": torch.get_num_threads(),
        "info": method.info,
    }


# ----------------------------------------------------------------------------------------------- driver


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: every block >= 64 KiB is mmapped, hence unmapped on free
MEMORY_KEYS = ("peak_bytes", "peak_growth_bytes", "timed_peak_bytes", "timed_peak_growth_bytes")


def spawn(args: argparse.Namespace, part: str, config: str, memory: bool = False) -> dict[str, Any]:
    """One configuration in a fresh process; ``memory``: the memory pass (fixed mmap threshold, fewer steps)."""
    spec = vars(args) | {"part": part, "config": config, "id3_t": args.warmup + args.steps}  # ID³: every timed step
    if memory:  # the same T (the same entries per step as timed); id3 runs all T steps, to its full selection
        spec |= {"steps": spec["id3_t"] - 1 if config == "id3" else args.memory_steps, "warmup": 1}
    return run_worker(run_config, spec, threads=args.threads, env=MALLOC_ENV if memory else None, label=config)


def measure(args: argparse.Namespace, part: str, configs: list[str]) -> dict[str, dict[str, Any]]:
    """The timing runs (``--repeats``, ``--wait-idle``, ``--noisy-retries``: the fastest is kept), then on CPU each
    configuration's memory pass, whose peaks replace the timing run's (kept as ``default_malloc``)."""
    res = measure_each(configs, lambda c: spawn(args, part, c), args)
    for config, best in res.items():
        best["default_malloc"] = {k: best[k] for k in MEMORY_KEYS}
        if args.device == "cpu" and args.memory_steps > 0:
            mem = spawn(args, part, config, memory=True)
            best.update({k: mem[k] for k in MEMORY_KEYS})
            best["memory_pass"] = True
    return res


def _verdict(ok: bool) -> str:
    return f"**{verdict(ok)}**"


def table(part: str, res: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    full = res.get("full")
    cuda = args.device == "cuda"
    mem = "peak CUDA alloc" if cuda else "peak RSS"
    if part == "llama":
        what = (
            f"## Part A, ID³ (issue #5): LlamaForCausalLM hidden {args.hidden}, intermediate {args.intermediate}, "
            f"{args.layers} layers, {args.heads} heads, vocab {args.vocab}; batch {args.batch} x {args.seq} tokens"
        )
    else:
        what = (
            f"## Part B, SaRA (issue #6): UNet2DConditionModel sample {args.unet_sample}, channels "
            f"{'/'.join(map(str, args.unet_channels))}, {args.unet_layers} layers per block, cross-attention dim "
            f"{args.unet_cross}; batch {args.unet_batch}, text {args.unet_batch} x {args.unet_text_len} x "
            f"{args.unet_cross}; DDPM epsilon loss"
        )
    any_r = next(iter(res.values()))
    memory_pass = all(r.get("memory_pass") for r in res.values())
    lines = [what, "", f"{any_r['total']:,} parameters."]
    notes = []
    for key, r in res.items():
        info = r["info"]
        bits = []
        if "layers" in info:
            bits.append(f"{info['layers']} layers")
        if "target_numel" in info:
            bits.append(f"{info['target_numel']:,} target entries")
        if "capacity" in info:
            bits.append(f"bank of {info['capacity']:,}")
        if "total_steps" in info:
            bits.append(f"T={info['total_steps']}")
        if "eligible" in info:
            bits.append(f"{info['eligible']} penalty-eligible matrices")
        if info.get("slow_path_layers"):
            bits.append(f"{info['slow_path_layers']} layers through functional_call")
        if bits:
            notes.append(f"{key}: " + ", ".join(bits))
    if notes:
        lines[-1] += " " + "; ".join(notes) + "."
    columns = ["configuration", "optimizer params", "entries trained", "step (ms)", "step / full FT"]
    columns += ["fwd / bwd / method / opt (ms)", "AdamW state (MiB)", f"{mem} growth (MiB)", "growth / full FT"]
    columns += ["growth in timed steps (MiB)", "timed / full FT", f"{mem} (MiB)"]
    columns += ["growth, default malloc (MiB)"] * memory_pass + ["others' CPU"]
    rows = [
        [
            f"`{key}` {LABELS[key]}",
            f"{r['trainable']:,}",
            f"{r['trained_entries']:,}",
            ms(r["step_s"]),
            ratio(r["step_s"], full["step_s"] if full else None),
            " / ".join(ms(r["phases_s"][k]) for k in ("fwd", "bwd", "method", "opt")),
            mib(r["opt_state_bytes"]),
            mib(r["peak_growth_bytes"]),
            ratio(r["peak_growth_bytes"], full["peak_growth_bytes"] if full else None),
            mib(r["timed_peak_growth_bytes"]),
            ratio(r["timed_peak_growth_bytes"], full["timed_peak_growth_bytes"] if full else None),
            mib(r["peak_bytes"]),
            *([mib(r["default_malloc"]["peak_growth_bytes"])] if memory_pass else []),
            others_cell(r["others_cpu_share"]),
        ]
        for key, r in res.items()
    ]
    lines += ["", *markdown_table(columns, rows)]
    lines += ["", "Goals (figures of this run):", ""]
    lines += goals(part, res, mem)
    lines.append("")
    return lines


def goals(part: str, res: dict[str, dict[str, Any]], mem: str) -> list[str]:
    out: list[str] = []
    full = res.get("full")
    if part == "llama":
        id3 = res.get("id3") or res.get("id3_steady")
        if id3 is not None:
            n = id3["info"]["target_numel"]
            budget = id3["info"]["capacity"]
            dense = 2 * n * 4  # AdamW's exp_avg + exp_avg_sq of the float32 target weights
            state_ratio = id3["opt_state_bytes"] / dense
            fraction = budget / n
            ok = abs(state_ratio / fraction - 1) <= STATE_TOLERANCE
            record(
                "sparse_memory",
                "ID3 AdamW state / (dense state x budget fraction)",
                state_ratio / fraction,
                f"1 ± {STATE_TOLERANCE:g}",
                ok,
            )
            ref = res.get("id3_masked")
            ref_txt = (
                f" (the reference-like run's measured AdamW state: {ref['opt_state_bytes']:,} bytes)" if ref else ""
            )
            out.append(
                f"- AdamW state = budget fraction: ID³ state {id3['opt_state_bytes']:,} bytes / dense AdamW state "
                f"of the target weights {dense:,} bytes{ref_txt} = {state_ratio:.5f}; budget fraction B/N = "
                f"{budget:,}/{n:,} = {fraction:.5f}; ratio {state_ratio / fraction:.4f} "
                f"(goal 1 ± {STATE_TOLERANCE:g}): {_verdict(ok)}"
            )
        sparse_keys = [k for k in ("id3", "id3_steady") if k in res]
        ref_key = "id3_masked"
    else:
        sparse_keys = [k for k in ("sara", "sara_all") if k in res]
        ref_key = "sara_masked"
    if full is None:
        out.append("- peak and step goals need the `full` configuration in the same run")
        return out
    for key in sparse_keys + ([ref_key] if ref_key in res else []):
        r = res[key]
        peak = r["peak_growth_bytes"] / full["peak_growth_bytes"]
        step = r["step_s"] / full["step_s"]
        timed = r["timed_peak_growth_bytes"] / full["timed_peak_growth_bytes"]
        tag = "" if key != ref_key else " (for comparison, not a goal)"
        goal = key != ref_key
        record(
            "sparse_memory",
            f"{key}: peak growth / full FT",
            peak,
            f"<= {PEAK_GOAL}" if goal else "",
            (peak <= PEAK_GOAL) if goal else None,
        )
        record(
            "sparse_memory",
            f"{key}: step / full FT",
            step,
            f"<= {STEP_GOAL}" if goal else "",
            (step <= STEP_GOAL) if goal else None,
        )
        out.append(
            f"- `{key}`{tag}: {mem} growth {mib(r['peak_growth_bytes'])} MiB / full FT "
            f"{mib(full['peak_growth_bytes'])} MiB = {peak:.3f} (goal <= {PEAK_GOAL}): {_verdict(peak <= PEAK_GOAL)} "
            f"(timed steps only: {timed:.3f}, {_verdict(timed <= PEAK_GOAL)}); "
            f"step {ms(r['step_s'])} ms / full FT {ms(full['step_s'])} ms = {step:.3f} "
            f"(goal <= {STEP_GOAL}): {_verdict(step <= STEP_GOAL)}"
        )
    return out


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of llama,unet")
    parser.add_argument("--configs", default="", help="comma-separated subset of the configurations (default all)")
    add_common_args(parser, steps=8, warmup=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (and ID³'s budget: LoRA's parameter count)")
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--tiny", action="store_true", help="small models for a smoke check")
    llama = parser.add_argument_group("part A (Llama, ID³)")
    llama.add_argument("--hidden", type=int, default=256)
    llama.add_argument("--layers", type=int, default=8)
    llama.add_argument("--intermediate", type=int, default=688)
    llama.add_argument("--heads", type=int, default=4)
    llama.add_argument("--vocab", type=int, default=2048)
    llama.add_argument("--batch", type=int, default=8)
    llama.add_argument("--seq", type=int, default=128)
    llama.add_argument("--id3-steady-t", type=int, default=2, help="T of the id3_steady configuration")
    unet = parser.add_argument_group("part B (UNet, SaRA)")
    unet.add_argument("--unet-sample", type=int, default=32)
    unet.add_argument("--unet-channels", type=_ints, default=(64, 128, 256))
    unet.add_argument("--unet-layers", type=int, default=2)
    unet.add_argument("--unet-cross", type=int, default=128)
    unet.add_argument("--unet-batch", type=int, default=4)
    unet.add_argument("--unet-text-len", type=int, default=8)
    unet.add_argument("--sara-fraction", type=float, default=0.1)
    unet.add_argument("--sara-lambda", type=float, default=5e-4)
    parser.add_argument(
        "--memory-steps",
        type=int,
        default=2,
        metavar="N",
        help="CPU: steps (after 1 warm-up) of the memory pass, a second fresh process per configuration with "
        "MALLOC_MMAP_THRESHOLD_=65536 whose peak RSS is reported; 0: report the timing run's peak RSS instead",
    )
    args = parse_args(parser)
    if args.id3_steady_t < 1:
        parser.error("--id3-steady-t must be >= 1")
    if args.tiny:
        args.hidden, args.layers, args.intermediate, args.heads, args.vocab = 64, 2, 172, 4, 256
        args.batch, args.seq = 2, 32
        args.unet_sample, args.unet_channels, args.unet_layers, args.unet_cross = 16, (32, 64), 1, 32
        args.unet_batch, args.unet_text_len = 2, 4
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or any(p not in PARTS for p in parts):
        parser.error(f"--parts must be a comma-separated subset of {','.join(PARTS)}")
    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    known = {c for p in parts for c in CONFIGS[p]}
    if any(c not in known for c in wanted):
        parser.error(f"--configs must name configurations of the parts run: {sorted(known)}")

    report = Report(args)
    report.header(
        "# Sparse methods: ID³ and SaRA memory and speed",
        packages=("transformers", "diffusers"),
        details=f"Plain PyTorch loops, AdamW (lr 1e-4) everywhere; median of {args.steps} steps after {args.warmup} "
        "warm-up; every configuration in a fresh process"
        + (f"; fastest of {args.repeats} interleaved repeats" if args.repeats > 1 else "")
        + (f"; up to {args.noisy_retries} re-runs of a disturbed measurement" if args.noisy_retries else "")
        + (
            f". Memory columns from a second fresh process per configuration (1 + {args.memory_steps} steps; "
            "id3: all T steps; "
            "glibc MALLOC_MMAP_THRESHOLD_=65536, so freed tensors leave the RSS); the last column is the timing "
            "run's growth under glibc's default (dynamic) mmap threshold"
            if args.device == "cpu" and args.memory_steps > 0
            else ""
        )
        + ".",
    )
    for part in parts:
        configs = [c for c in CONFIGS[part] if not wanted or c in wanted]
        if configs:
            report.print(table(part, measure(args, part, configs), args))
    report.close()


if __name__ == "__main__":
    main()
