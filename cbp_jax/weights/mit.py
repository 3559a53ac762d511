"""Key maps of MiT (SegFormer) encoders: HF transformers (v4 and 5.x names), NVlabs, mmseg 1.x."""

from cbp_jax.weights.rules import (
    B,
    conv,
    fused_qkv,
    layer_norm,
    linear,
    linear_1x1,
    linear_kernel,
    one_based,
    rules,
    same,
    split,
)

# HF transformers SegFormer encoder, v4 names (also what transformers 5 writes to disk).
HF_MIT_V4 = rules(
    conv(rf"encoder\.patch_embeddings\.{B}\.proj", "stages.{}.patch_embed.proj"),
    layer_norm(rf"encoder\.patch_embeddings\.{B}\.layer_norm", "stages.{}.patch_embed.norm"),
    layer_norm(rf"encoder\.block\.{B}\.{B}\.layer_norm_1", "stages.{}.blocks.{}.norm1"),
    layer_norm(rf"encoder\.block\.{B}\.{B}\.layer_norm_2", "stages.{}.blocks.{}.norm2"),
    linear(rf"encoder\.block\.{B}\.{B}\.attention\.self\.query", "stages.{}.blocks.{}.attn.q"),
    linear(rf"encoder\.block\.{B}\.{B}\.attention\.self\.key", "stages.{}.blocks.{}.attn.k"),
    linear(rf"encoder\.block\.{B}\.{B}\.attention\.self\.value", "stages.{}.blocks.{}.attn.v"),
    conv(rf"encoder\.block\.{B}\.{B}\.attention\.self\.sr", "stages.{}.blocks.{}.attn.sr"),
    layer_norm(
        rf"encoder\.block\.{B}\.{B}\.attention\.self\.layer_norm",
        "stages.{}.blocks.{}.attn.sr_norm",
    ),
    linear(rf"encoder\.block\.{B}\.{B}\.attention\.output\.dense", "stages.{}.blocks.{}.attn.proj"),
    linear(rf"encoder\.block\.{B}\.{B}\.mlp\.dense1", "stages.{}.blocks.{}.mlp.fc1"),
    conv(rf"encoder\.block\.{B}\.{B}\.mlp\.dwconv\.dwconv", "stages.{}.blocks.{}.mlp.dwconv"),
    linear(rf"encoder\.block\.{B}\.{B}\.mlp\.dense2", "stages.{}.blocks.{}.mlp.fc2"),
    layer_norm(rf"encoder\.layer_norm\.{B}", "stages.{}.norm"),
)
# transformers 5.x in-memory names (a raw ``model.state_dict()``).
HF_MIT_V5 = rules(
    conv(rf"stages\.{B}\.patch_embeddings\.proj", "stages.{}.patch_embed.proj"),
    layer_norm(rf"stages\.{B}\.patch_embeddings\.layer_norm", "stages.{}.patch_embed.norm"),
    layer_norm(rf"stages\.{B}\.blocks\.{B}\.layernorm_before", "stages.{}.blocks.{}.norm1"),
    layer_norm(rf"stages\.{B}\.blocks\.{B}\.layernorm_after", "stages.{}.blocks.{}.norm2"),
    linear(rf"stages\.{B}\.blocks\.{B}\.attention\.q_proj", "stages.{}.blocks.{}.attn.q"),
    linear(rf"stages\.{B}\.blocks\.{B}\.attention\.k_proj", "stages.{}.blocks.{}.attn.k"),
    linear(rf"stages\.{B}\.blocks\.{B}\.attention\.v_proj", "stages.{}.blocks.{}.attn.v"),
    conv(
        rf"stages\.{B}\.blocks\.{B}\.attention\.sequence_reduction\.sequence_reduction",
        "stages.{}.blocks.{}.attn.sr",
    ),
    layer_norm(
        rf"stages\.{B}\.blocks\.{B}\.attention\.sequence_reduction\.layer_norm",
        "stages.{}.blocks.{}.attn.sr_norm",
    ),
    linear(rf"stages\.{B}\.blocks\.{B}\.attention\.o_proj", "stages.{}.blocks.{}.attn.proj"),
    linear(rf"stages\.{B}\.blocks\.{B}\.mlp\.fc1", "stages.{}.blocks.{}.mlp.fc1"),
    conv(rf"stages\.{B}\.blocks\.{B}\.mlp\.dwconv\.dwconv", "stages.{}.blocks.{}.mlp.dwconv"),
    linear(rf"stages\.{B}\.blocks\.{B}\.mlp\.fc2", "stages.{}.blocks.{}.mlp.fc2"),
    layer_norm(rf"stages\.{B}\.layer_norm", "stages.{}.norm"),
)
# NVlabs mit_b*.pth; NVlabs (mmseg 0.x) SegFormer checkpoints add ``backbone.`` + this head.
NVLABS_MIT = rules(
    conv(r"patch_embed(\d)\.proj", one_based("stages.{}.patch_embed.proj")),
    layer_norm(r"patch_embed(\d)\.norm", one_based("stages.{}.patch_embed.norm")),
    layer_norm(rf"block(\d)\.{B}\.norm1", one_based("stages.{}.blocks.{}.norm1")),
    layer_norm(rf"block(\d)\.{B}\.norm2", one_based("stages.{}.blocks.{}.norm2")),
    linear(rf"block(\d)\.{B}\.attn\.q", one_based("stages.{}.blocks.{}.attn.q")),
    [
        (
            rf"block(\d)\.{B}\.attn\.kv\.{p}",
            [
                (one_based("stages.{}.blocks.{}.attn.k." + n), split(2, 0, fn)),
                (one_based("stages.{}.blocks.{}.attn.v." + n), split(2, 1, fn)),
            ],
        )
        for p, n, fn in (("weight", "kernel", linear_kernel), ("bias", "bias", same))
    ],
    conv(rf"block(\d)\.{B}\.attn\.sr", one_based("stages.{}.blocks.{}.attn.sr")),
    layer_norm(rf"block(\d)\.{B}\.attn\.norm", one_based("stages.{}.blocks.{}.attn.sr_norm")),
    linear(rf"block(\d)\.{B}\.attn\.proj", one_based("stages.{}.blocks.{}.attn.proj")),
    linear(rf"block(\d)\.{B}\.mlp\.fc1", one_based("stages.{}.blocks.{}.mlp.fc1")),
    conv(rf"block(\d)\.{B}\.mlp\.dwconv\.dwconv", one_based("stages.{}.blocks.{}.mlp.dwconv")),
    linear(rf"block(\d)\.{B}\.mlp\.fc2", one_based("stages.{}.blocks.{}.mlp.fc2")),
    layer_norm(r"norm(\d)", one_based("stages.{}.norm")),
)
MMSEG_MIT = rules(
    conv(rf"layers\.{B}\.0\.projection", "stages.{}.patch_embed.proj"),
    layer_norm(rf"layers\.{B}\.0\.norm", "stages.{}.patch_embed.norm"),
    layer_norm(rf"layers\.{B}\.1\.{B}\.norm1", "stages.{}.blocks.{}.norm1"),
    layer_norm(rf"layers\.{B}\.1\.{B}\.norm2", "stages.{}.blocks.{}.norm2"),
    fused_qkv(rf"layers\.{B}\.1\.{B}\.attn\.attn\.in_proj", "stages.{}.blocks.{}.attn", sep="_"),
    linear(rf"layers\.{B}\.1\.{B}\.attn\.attn\.out_proj", "stages.{}.blocks.{}.attn.proj"),
    conv(rf"layers\.{B}\.1\.{B}\.attn\.sr", "stages.{}.blocks.{}.attn.sr"),
    layer_norm(rf"layers\.{B}\.1\.{B}\.attn\.norm", "stages.{}.blocks.{}.attn.sr_norm"),
    linear_1x1(rf"layers\.{B}\.1\.{B}\.ffn\.layers\.0", "stages.{}.blocks.{}.mlp.fc1"),
    conv(rf"layers\.{B}\.1\.{B}\.ffn\.layers\.1", "stages.{}.blocks.{}.mlp.dwconv"),
    linear_1x1(rf"layers\.{B}\.1\.{B}\.ffn\.layers\.4", "stages.{}.blocks.{}.mlp.fc2"),
    layer_norm(rf"layers\.{B}\.2", "stages.{}.norm"),
)
