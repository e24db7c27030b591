"""Audio presets (transformers): Audio Spectrogram Transformer, wav2vec 2.0 and Whisper's encoder."""

from __future__ import annotations

from lightning_peft.backbones.registry import Preset, register

_AST = "audio_spectrogram_transformer"


def _with_base(base: str, *names: str) -> tuple[str, ...]:
    """Each name under the attribute ``base`` (where a head class holds its base model), then bare (the base model)."""
    return tuple(name for bare in names for name in (f"{base}.{bare}", bare))


_AST_ALWAYS_ON = (*_with_base(_AST, "embeddings", "layernorm"), "classifier")

# AST renamed its modules in transformers 5: the layout whose block path exists in the model is picked.
register(
    Preset(  # transformers >= 5
        family="hf-ast",
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "mlp.fc1", "mlp.fc2"),
        block_paths=(f"{_AST}.layers", "layers"),
        always_on=_AST_ALWAYS_ON,
        head=("classifier",),
        groups=(
            ("attention", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("feed_forward", ("mlp.fc1", "mlp.fc2")),
            ("norm", ("layernorm_before", "layernorm_after")),
        ),
    ),
    Preset(  # transformers < 5
        family="hf-ast",
        target_modules=("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
        block_paths=(f"{_AST}.encoder.layer", "encoder.layer"),
        always_on=_AST_ALWAYS_ON,
        head=("classifier",),
        groups=(
            ("attention", ("query", "key", "value", "attention.output.dense")),
            ("feed_forward", ("intermediate.dense", "output.dense")),  # the longer entry wins attention.output.dense
            ("norm", ("layernorm_before", "layernorm_after")),
        ),
    ),
    model_types=("audio-spectrogram-transformer",),
)

_W2V_FEED_FORWARD = ("feed_forward.intermediate_dense", "feed_forward.output_dense")
_W2V_HEADS = ("projector", "classifier", "lm_head")

register(
    Preset(
        family="hf-wav2vec2",
        target_modules=("q_proj", "k_proj", "v_proj", "out_proj", *_W2V_FEED_FORWARD),
        block_paths=("wav2vec2.encoder.layers", "encoder.layers"),
        always_on=(
            *_with_base("wav2vec2", "feature_projection", "encoder.pos_conv_embed", "encoder.layer_norm"),
            *_W2V_HEADS,
        ),
        head=_W2V_HEADS,
        groups=(
            ("attention", ("q_proj", "k_proj", "v_proj", "out_proj")),
            ("feed_forward", _W2V_FEED_FORWARD),
            ("norm", ("layer_norm", "final_layer_norm")),
        ),
    ),
    model_types=("wav2vec2",),
)

# embed_positions is left out on purpose: transformers keeps the encoder's sinusoidal position table frozen.
_WHISPER_STEM = ("encoder.conv1", "encoder.conv2", "model.encoder.conv1", "model.encoder.conv2", "conv1", "conv2")
_WHISPER_NORM = ("encoder.layer_norm", "model.encoder.layer_norm", "layer_norm")
_WHISPER_HEADS = ("projector", "classifier", "proj_out")

# The targets match Whisper's decoder too when the model has one, but its blocks are the encoder layers.
register(
    Preset(
        family="hf-whisper",
        target_modules=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        block_paths=("encoder.layers", "model.encoder.layers", "layers"),
        always_on=(*_WHISPER_STEM, *_WHISPER_NORM, *_WHISPER_HEADS),
        head=_WHISPER_HEADS,
        groups=(
            ("attention", ("q_proj", "k_proj", "v_proj", "out_proj")),
            ("feed_forward", ("fc1", "fc2")),
            ("norm", ("self_attn_layer_norm", "final_layer_norm")),
        ),
    ),
    model_types=("whisper",),
)
