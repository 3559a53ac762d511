"""Key maps of Swin encoders: HF transformers (v4 names), official microsoft, mmseg 1.x."""

from cbp_jax.weights.rules import (
    B,
    conv,
    fused_qkv,
    layer_norm,
    linear,
    one_based,
    param,
    rules,
    unfold_linear,
    unfold_vector,
)

# HF Swin, v4 names (what transformers 5 still writes to disk).
_HB = rf"encoder\.layers\.{B}\.blocks\.{B}\."
HF_SWIN = rules(
    conv(r"embeddings\.patch_embeddings\.projection", "patch_embed_proj"),
    layer_norm(r"embeddings\.norm", "patch_embed_norm"),
    layer_norm(_HB + "layernorm_before", "stages.{}.blocks.{}.norm1"),
    layer_norm(_HB + "layernorm_after", "stages.{}.blocks.{}.norm2"),
    linear(_HB + r"attention\.self\.query", "stages.{}.blocks.{}.attn.q"),
    linear(_HB + r"attention\.self\.key", "stages.{}.blocks.{}.attn.k"),
    linear(_HB + r"attention\.self\.value", "stages.{}.blocks.{}.attn.v"),
    linear(_HB + r"attention\.output\.dense", "stages.{}.blocks.{}.attn.proj"),
    param(
        _HB + r"attention\.self\.relative_position_bias_table",
        "stages.{}.blocks.{}.attn.relative_position_bias_table",
    ),
    linear(_HB + r"intermediate\.dense", "stages.{}.blocks.{}.mlp.fc1"),
    linear(_HB + r"output\.dense", "stages.{}.blocks.{}.mlp.fc2"),
    layer_norm(rf"encoder\.layers\.{B}\.downsample\.norm", "stages.{}.downsample.norm"),
    linear(rf"encoder\.layers\.{B}\.downsample\.reduction", "stages.{}.downsample.reduction"),
    layer_norm(r"hidden_states_norms\.stage(\d)", one_based("out_norms.{}")),
)


def _swin_rules(layers: str, proj: str, attn: str, fc1: str, fc2: str, unfold: bool):
    blk = rf"{layers}\.{B}\.blocks\.{B}\."
    dst = "stages.{}.blocks.{}."
    down = rf"{layers}\.{B}\.downsample\."
    merge = (
        [
            (
                down + r"reduction\.weight",
                [("stages.{}.downsample.reduction.kernel", unfold_linear)],
            ),
            (down + r"norm\.weight", [("stages.{}.downsample.norm.scale", unfold_vector)]),
            (down + r"norm\.bias", [("stages.{}.downsample.norm.bias", unfold_vector)]),
        ]
        if unfold
        else linear(down + "reduction", "stages.{}.downsample.reduction")
        + layer_norm(down + "norm", "stages.{}.downsample.norm")
    )
    return rules(
        conv(rf"patch_embed\.{proj}", "patch_embed_proj"),
        layer_norm(r"patch_embed\.norm", "patch_embed_norm"),
        layer_norm(blk + "norm1", dst + "norm1"),
        layer_norm(blk + "norm2", dst + "norm2"),
        fused_qkv(blk + attn + r"\.qkv", dst + "attn"),
        linear(blk + attn + r"\.proj", dst + "attn.proj"),
        param(
            blk + attn + r"\.relative_position_bias_table",
            dst + "attn.relative_position_bias_table",
        ),
        linear(blk + fc1, dst + "mlp.fc1"),
        linear(blk + fc2, dst + "mlp.fc2"),
        merge,
        layer_norm(r"norm(\d)", "out_norms.{}"),  # segmentation backbones
    )


OFFICIAL_SWIN = _swin_rules("layers", "proj", r"attn", r"mlp\.fc1", r"mlp\.fc2", unfold=False)
MMSEG_SWIN = _swin_rules(
    "stages", "projection", r"attn\.w_msa", r"ffn\.layers\.0\.0", r"ffn\.layers\.1", unfold=True
)
SWIN_BUFFERS = (r"\.relative_position_index$", r"\.attn_mask$")
