"""Causal language model presets (transformers): the Llama layout and its kin, Phi-3, GPT-2."""

from __future__ import annotations

from lightning_peft.backbones.registry import Preset, register

_LLAMA_ALWAYS_ON = ("model.embed_tokens", "embed_tokens", "model.norm", "norm", "lm_head", "score")
_HEAD = ("lm_head", "score")
_LLAMA_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",  # gemma2
    "post_feedforward_layernorm",
)

register(
    Preset(
        family="hf-llama",
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        block_paths=("model.layers", "layers"),
        always_on=_LLAMA_ALWAYS_ON,
        head=_HEAD,
        groups=(
            ("attention", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("feed_forward", ("gate_proj", "up_proj", "down_proj")),
            ("norm", _LLAMA_NORMS),
        ),
    ),
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"),  # one layout
)

register(
    Preset(
        family="hf-phi3",
        target_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        block_paths=("model.layers", "layers"),
        always_on=_LLAMA_ALWAYS_ON,
        head=_HEAD,
        groups=(
            ("attention", ("qkv_proj", "o_proj")),
            ("feed_forward", ("gate_up_proj", "down_proj")),
            ("norm", _LLAMA_NORMS),
        ),
    ),
    model_types=("phi3",),
)

register(
    Preset(
        family="hf-gpt2",
        target_modules=("c_attn", "c_proj", "c_fc"),  # transformers' Conv1D, not nn.Linear
        block_paths=("transformer.h", "h"),
        always_on=("transformer.wte", "wte", "transformer.wpe", "wpe", "transformer.ln_f", "ln_f", "lm_head", "score"),
        head=_HEAD,
        groups=(
            ("attention", ("attn.c_attn", "attn.c_proj")),
            ("feed_forward", ("mlp.c_fc", "mlp.c_proj")),
            ("norm", ("ln_1", "ln_2")),
        ),
    ),
    model_types=("gpt2",),
)
