"""Helpers for the PyTorch/transformers reference tests (not a test module)."""

import numpy as np
import torch
from flax import nnx
from torch import nn

TOL = 1e-4  # float32 parity bound


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Fills every float parameter and buffer with random values, so parity is not trivial.

    Weights N(0, 1 / fan_in) (activations stay O(1), so float32 rounding stays small), norm/BN
    scales ~ 1 + noise, running variances in [0.5, 1.5], biases and the rest N(0, scale).
    Returns the model in eval mode.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.ndim == 1 and name.endswith("weight"):
                t.copy_(1.0 + scale * torch.randn(t.shape, generator=g))
            elif t.ndim >= 2:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) / fan_in**0.5)
            else:
                t.copy_(scale * torch.randn(t.shape, generator=g))
    return model.eval()


def nhwc(t: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) torch tensor -> (B, H, W, C) NumPy array."""
    return t.detach().permute(0, 2, 3, 1).numpy()


def images(b: int, h: int, w: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Random images as (B, H, W, 3) NumPy and the same as (B, 3, H, W) torch."""
    x = np.random.default_rng(seed).normal(size=(b, h, w, 3)).astype(np.float32)
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


@nnx.jit
def forward_eval(model, x):
    """``model(x, train=False)``, jitted once per model structure."""
    return model(x, train=False)


def assert_close(ours, ref: np.ndarray, tol: float = TOL) -> None:
    """Same shape and max |ours - ref| <= tol."""
    ours = np.asarray(ours)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.abs(ours - ref).max())
    assert err <= tol, f"max abs diff {err} > {tol}"


# ----------------------------------------------------------------------------- mmseg in torch.nn
# mmseg's ResNetV1c / FCNHead written from torch.nn layers with mmseg's attribute names, so that
# a state_dict() is an mmseg checkpoint (transformers has no deep-stem ResNet).


def conv_bn(din, dout, k, stride=1, dilation=1):
    conv = nn.Conv2d(din, dout, k, stride, dilation * (k // 2), dilation, bias=False)
    return conv, nn.BatchNorm2d(dout)


class MMSegBottleneck(nn.Module):
    """mmseg Bottleneck, style 'pytorch' (stride in conv2), attribute names as mmseg's."""

    def __init__(self, din, planes, stride, dilation):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(din, planes, 1)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3, stride, dilation)
        self.conv3, self.bn3 = conv_bn(planes, planes * 4, 1)
        self.downsample = None
        if stride != 1 or din != planes * 4:
            self.downsample = nn.Sequential(*conv_bn(din, planes * 4, 1, stride))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class MMSegResNetV1c(nn.Module):
    """mmseg ResNetV1c: deep stem, max pool, 4 res layers with contract dilation."""

    def __init__(self, depths, stem=64, base=64, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4)):
        super().__init__()
        c0, c1 = conv_bn(3, stem // 2, 3, 2), conv_bn(stem // 2, stem // 2, 3)
        c2 = conv_bn(stem // 2, stem, 3)
        self.stem = nn.Sequential(*c0, nn.ReLU(), *c1, nn.ReLU(), *c2, nn.ReLU())
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        din = stem
        for i, depth in enumerate(depths):
            planes, d = base * 2**i, dilations[i]
            blocks = [MMSegBottleneck(din, planes, strides[i], d // 2 if d > 1 else d)]
            blocks += [MMSegBottleneck(planes * 4, planes, 1, d) for _ in range(depth - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            din = planes * 4

    def forward(self, x):
        x = self.maxpool(self.stem(x))
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return outs


class MMSegConvModule(nn.Module):
    def __init__(self, din, dout):
        super().__init__()
        self.conv, self.bn = conv_bn(din, dout, 3)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class MMSegFCNHead(nn.Module):
    """mmseg FCNHead (eval mode: no dropout), with its conv_seg."""

    def __init__(self, din, width, num_convs, concat_input, num_classes, in_index):
        super().__init__()
        self.in_index = in_index
        self.convs = nn.ModuleList(
            [MMSegConvModule(din if i == 0 else width, width) for i in range(num_convs)]
        )
        self.conv_cat = MMSegConvModule(din + width, width) if concat_input else None
        self.conv_seg = nn.Conv2d(width, num_classes, 1)

    def forward(self, feats):
        x = inp = feats[self.in_index]
        for conv in self.convs:
            x = conv(x)
        if self.conv_cat is not None:
            x = self.conv_cat(torch.cat([inp, x], dim=1))
        return self.conv_seg(x)


class MMSegFCN(nn.Module):
    """mmseg EncoderDecoder(ResNetV1c, FCNHead, auxiliary FCNHead): mmseg's key names."""

    def __init__(self, depths, stem, base, width, aux_width, num_classes):
        super().__init__()
        self.backbone = MMSegResNetV1c(depths, stem, base)
        dims = [base * 2**i * 4 for i in range(4)]
        self.decode_head = MMSegFCNHead(dims[3], width, 2, True, num_classes, 3)
        self.auxiliary_head = MMSegFCNHead(dims[2], aux_width, 1, False, num_classes, 2)
