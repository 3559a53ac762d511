"""Key maps of ConvNeXt encoders: HF transformers, timm, Facebook / mmpretrain."""

from cbp_jax.weights.rules import B, conv, layer_norm, linear, one_based, param, rules

HF_CONVNEXT = rules(
    conv(r"embeddings\.patch_embeddings", "stem_conv"),
    layer_norm(r"embeddings\.layernorm", "stem_norm"),
    layer_norm(rf"encoder\.stages\.{B}\.downsampling_layer\.0", "stages.{}.down_norm"),
    conv(rf"encoder\.stages\.{B}\.downsampling_layer\.1", "stages.{}.down_conv"),
    conv(rf"encoder\.stages\.{B}\.layers\.{B}\.dwconv", "stages.{}.blocks.{}.dwconv"),
    layer_norm(rf"encoder\.stages\.{B}\.layers\.{B}\.layernorm", "stages.{}.blocks.{}.norm"),
    linear(rf"encoder\.stages\.{B}\.layers\.{B}\.pwconv1", "stages.{}.blocks.{}.fc1"),
    linear(rf"encoder\.stages\.{B}\.layers\.{B}\.pwconv2", "stages.{}.blocks.{}.fc2"),
    param(
        rf"encoder\.stages\.{B}\.layers\.{B}\.layer_scale_parameter", "stages.{}.blocks.{}.gamma"
    ),
    layer_norm(r"hidden_states_norms\.stage(\d)", one_based("out_norms.{}")),
)
TIMM_CONVNEXT = rules(
    conv(r"stem\.0", "stem_conv"),
    layer_norm(r"stem\.1", "stem_norm"),
    layer_norm(rf"stages\.{B}\.downsample\.0", "stages.{}.down_norm"),
    conv(rf"stages\.{B}\.downsample\.1", "stages.{}.down_conv"),
    conv(rf"stages\.{B}\.blocks\.{B}\.conv_dw", "stages.{}.blocks.{}.dwconv"),
    layer_norm(rf"stages\.{B}\.blocks\.{B}\.norm", "stages.{}.blocks.{}.norm"),
    linear(rf"stages\.{B}\.blocks\.{B}\.mlp\.fc1", "stages.{}.blocks.{}.fc1"),
    linear(rf"stages\.{B}\.blocks\.{B}\.mlp\.fc2", "stages.{}.blocks.{}.fc2"),
    param(rf"stages\.{B}\.blocks\.{B}\.gamma", "stages.{}.blocks.{}.gamma"),
)
FB_CONVNEXT = rules(
    conv(r"downsample_layers\.0\.0", "stem_conv"),
    layer_norm(r"downsample_layers\.0\.1", "stem_norm"),
    layer_norm(r"downsample_layers\.([1-9])\.0", "stages.{}.down_norm"),
    conv(r"downsample_layers\.([1-9])\.1", "stages.{}.down_conv"),
    conv(rf"stages\.{B}\.{B}\.(?:dwconv|depthwise_conv)", "stages.{}.blocks.{}.dwconv"),
    layer_norm(rf"stages\.{B}\.{B}\.norm", "stages.{}.blocks.{}.norm"),
    linear(rf"stages\.{B}\.{B}\.(?:pwconv1|pointwise_conv1)", "stages.{}.blocks.{}.fc1"),
    linear(rf"stages\.{B}\.{B}\.(?:pwconv2|pointwise_conv2)", "stages.{}.blocks.{}.fc2"),
    param(rf"stages\.{B}\.{B}\.gamma", "stages.{}.blocks.{}.gamma"),
    # segmentation backbones (Facebook, mmpretrain in mmseg)
    layer_norm(r"norm(\d)", "out_norms.{}"),
)
