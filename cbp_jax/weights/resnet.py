"""Key map of mmcv / mmseg ResNetV1c (deep 3x3 stem)."""

from cbp_jax.weights.rules import B, batch_norm, conv, one_based, rules

# mmcv / mmseg ResNetV1c: stem.{0,3,6} convs and stem.{1,4,7} BNs; layer{1..4}.{j}.
MMSEG_RESNET_V1C = rules(
    *(conv(rf"stem\.{3 * i}", f"stem.{i}.conv") for i in range(3)),
    *(batch_norm(rf"stem\.{3 * i + 1}", f"stem.{i}.bn") for i in range(3)),
    conv(rf"layer(\d)\.{B}\.conv(\d)", one_based("stages.{}.{}.conv{}.conv")),
    batch_norm(rf"layer(\d)\.{B}\.bn(\d)", one_based("stages.{}.{}.conv{}.bn")),
    conv(rf"layer(\d)\.{B}\.downsample\.0", one_based("stages.{}.{}.downsample.conv")),
    batch_norm(rf"layer(\d)\.{B}\.downsample\.1", one_based("stages.{}.{}.downsample.bn")),
)
