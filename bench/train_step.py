"""Train-step and inference speed of cbp_jax against PyTorch eager (transformers SegFormer).

    python bench/train_step.py --quick            # B0, batch 8, 256x256: ends "speedup_vs_pytorch"
    python bench/train_step.py --model segformer_b5 --batch 2 --size 512 --steps 5
    python bench/train_step.py --quick --profile  # + where the cbp_jax step spends its time
    python bench/train_step.py --memory           # compiled memory of the B5 step (no timing)
    python bench/train_step.py --model upernet_convnext_base --size 512 --dtype bfloat16 \
        --variants jax-cbp-occl,torch-ce          # on a GPU: PyTorch runs on CUDA, autocast

Both sides run in this one process, on the same shapes and thread count (float32, or
``--dtype bfloat16``: cbp_jax's compute dtype, PyTorch's CUDA autocast; parameters stay
float32 on both sides). On a GPU host both run on the GPU; the tables then add each
variant's memory (cbp_jax: XLA's compiled memory analysis of its step; PyTorch: peak
allocated by the step):

- cbp_jax: ``models.create`` + ``train_lib.make_train_step`` under ``jax.jit`` with the
  state donated and the batch sharded over one CPU device per core (``cbp_jax.cpu``;
  ``--one-device`` for a single device), as ``train.py`` runs it. Rows: CBP + OCCL (the
  default model, mmseg head of width 256) and the same model with a learned classifier and
  CE only.
- PyTorch: transformers' ``SegformerForSemanticSegmentation`` with the same encoder, a
  256-wide decode head, dropout and drop path, AdamW, CE on bilinearly upsampled logits
  (ignore 255). "PyTorch CBP + OCCL" swaps its classifier for frozen prototypes and adds
  OCCL written in PyTorch below (``torch_occl``), to measure the overhead on that side too.

UperNet-ConvNeXt (``--model upernet_convnext_*``) is compared with transformers'
``UperNetForSemanticSegmentation`` (ConvNeXt backbone, auxiliary FCN head, CE + 0.4 x aux).

Variants are stepped round-robin after a warm-up, so slow drift of the machine hits all of
them alike; the table shows medians and the spread (10th-90th percentile). Inference is the
eval-mode forward at the same shapes. Speedups are PyTorch time / cbp_jax time, from medians.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/, cbp_jax

if "--one-device" not in sys.argv:
    from cbp_jax import cpu

    cpu.use_cores_as_devices()  # as train.py does: the batch sharded over the cores

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from cbp_jax import factories, losses, sharding, train_lib  # noqa: E402
from cbp_jax.factories import model_from_config  # noqa: E402
from configs import common  # noqa: E402

CONVNEXT = {  # transformers ConvNextConfig fields (and UperNet's auxiliary input width)
    "upernet_convnext_tiny": dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3]),
    "upernet_convnext_base": dict(hidden_sizes=[128, 256, 512, 1024], depths=[3, 3, 27, 3]),
}
VARIANTS = {  # --variants key: row name
    "jax-cbp-occl": "cbp_jax CBP + OCCL",
    "jax-ce": "cbp_jax learned + CE",
    "torch-ce": "PyTorch learned + CE",
    "torch-cbp-occl": "PyTorch CBP + OCCL",
}
MIT = {  # transformers SegformerConfig fields of each MiT variant
    "segformer_b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2]),
    "segformer_b1": dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 2, 2]),
    "segformer_b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3]),
    "segformer_b5": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 6, 40, 3]),
}


def jax_config(name: str, num_classes: int, *, cbp: bool, dtype: str = "float32", remat=False):
    c = common.base_config()
    if name in CONVNEXT:
        common.upernet_convnext_recipe(c, name, drop_path=0.4)
    else:
        common.segformer_recipe(c, name)
    c.data.num_classes = num_classes
    c.model.dtype = dtype
    c.model.remat = remat
    c.optimizer.warmup_steps = 10
    c.total_steps = 1000
    if not cbp:
        common.apply_variants(c, "baseline")
    return c


class JaxVariant:
    """One jitted, donated cbp_jax train step and eval forward on a fixed batch."""

    def __init__(self, config, images: np.ndarray, labels: np.ndarray):
        mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
        setup = factories.TrainSetup(config, mesh)  # as train.py builds it
        self.graphdef = setup.graphdef
        self.state = setup.init_state()
        self.step_fn = setup.train_step()
        self.predict_fn = jax.jit(train_lib.make_predict_fn(self.graphdef))
        self.batch = jax.device_put(
            {"image": jnp.asarray(images), "label": jnp.asarray(labels)}, setup.batch_sharding
        )
        # Compiled ahead (jit's later calls reuse it) for the memory analysis.
        self.memory_mb = compiled_memory_mb(self.step_fn.lower(self.state, self.batch).compile())

    def step(self):
        self.state, metrics = self.step_fn(self.state, self.batch)
        jax.block_until_ready(metrics["loss"])

    def infer(self):
        jax.block_until_ready(self.predict_fn(self.state, self.batch["image"]))


def torch_occl(features, labels, prototypes, *, tau=0.07, lam=1.0, phi=0.1, ignore=255):
    """OCCL (docs/method.md section 2) in PyTorch: features (B, C, h, w), labels (B, h, w)."""
    import torch
    import torch.nn.functional as F

    b, c = features.shape[:2]
    n = prototypes.shape[0]
    flat = features.permute(0, 2, 3, 1).reshape(-1, c)
    dev = features.device
    view = (
        (torch.arange(b, device=dev) >= b // 2).long()[:, None, None].expand_as(labels).reshape(-1)
    )
    lab = labels.reshape(-1)
    seg = torch.where(lab != ignore, view * n + lab, torch.full_like(lab, 2 * n))
    sums = torch.zeros(2 * n + 1, c, device=dev).index_add_(0, seg, flat)[: 2 * n].view(2, n, c)
    counts = torch.bincount(seg, minlength=2 * n + 1)[: 2 * n].view(2, n).float()
    cent = sums / counts.clamp(min=1)[..., None]
    present = counts > 0
    valid = present[0] & present[1]
    q = F.normalize(cent, dim=-1)
    keys = F.normalize(cent.mean(0), dim=-1).detach()
    protos = F.normalize(prototypes, dim=-1)
    pos = (q[0] * q[1]).sum(-1) / tau
    neg = torch.einsum("xic,jc->xij", q, keys) / tau
    mask = valid[None, :] & ~torch.eye(n, dtype=torch.bool, device=dev)
    neg = neg.masked_fill(~mask[None], float("-inf"))
    logits = torch.cat([pos.expand(2, n)[..., None], neg], -1)
    cnll = torch.logsumexp(logits, -1) - pos[None]
    vm = valid.float()
    centroid = sum((cnll[x] * vm).sum() / vm.sum().clamp(min=1) for x in range(2)) / 2
    plog = torch.einsum("xic,jc->xij", q, protos) / tau
    knll = torch.logsumexp(plog, -1) - torch.diagonal(plog, dim1=1, dim2=2)
    pm = present.float()
    category = sum((knll[x] * pm[x]).sum() / pm[x].sum().clamp(min=1) for x in range(2)) / 2
    return lam * centroid + phi * category


def compiled_memory_mb(compiled) -> float:
    """Peak estimate of a compiled step: arguments + temporaries + non-aliased outputs (MB)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return float("nan")
    out_extra = mem.output_size_in_bytes - mem.alias_size_in_bytes
    return (mem.argument_size_in_bytes + mem.temp_size_in_bytes + out_extra) / 2**20


def torch_model(name: str, num_classes: int):
    """transformers' SegFormer (256-wide head) or UperNet-ConvNeXt for ``name``."""
    import transformers as T

    if name in CONVNEXT:
        dims = CONVNEXT[name]["hidden_sizes"]
        backbone = T.ConvNextConfig(
            **CONVNEXT[name],
            drop_path_rate=0.4,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        )
        cfg = T.UperNetConfig(
            backbone_config=backbone, num_labels=num_classes, auxiliary_in_channels=dims[2]
        )
        return T.UperNetForSemanticSegmentation(cfg)
    cfg = T.SegformerConfig(num_labels=num_classes, decoder_hidden_size=256, **MIT[name])
    return T.SegformerForSemanticSegmentation(cfg)


class TorchVariant:
    """transformers SegFormer/UperNet + AdamW; ``cbp=True`` swaps in frozen prototypes and
    OCCL (SegFormer only). On a CUDA host it runs there, under bf16 autocast if asked."""

    def __init__(self, name, num_classes, images, labels, *, cbp: bool, dtype="float32"):
        import torch

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
        torch.manual_seed(0)
        self.model = torch_model(name, num_classes)
        self.upernet = name in CONVNEXT
        self.cbp = cbp
        if cbp:
            if self.upernet:
                raise ValueError("the PyTorch CBP + OCCL variant is SegFormer only")
            w = torch.linalg.qr(torch.randn(256, num_classes))[0].T.contiguous()  # (N, 256)
            self.model.decode_head.classifier = _FrozenPrototypes(w)
        self.model.to(self.device)
        self.opt = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=6e-5, weight_decay=0.01
        )
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        self.images = torch.from_numpy(images).to(self.device)
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        self.memory_mb = 0.0 if self.device == "cuda" else float("nan")

    def _autocast(self):
        return self.torch.autocast(
            self.device, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def step(self):
        torch, F = self.torch, self.torch.nn.functional
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.model.train()
        with self._autocast():
            if self.upernet:  # transformers computes CE + 0.4 x auxiliary CE itself
                loss = self.model(pixel_values=self.images, labels=self.labels).loss
            else:
                logits = self.model(pixel_values=self.images).logits
                up = F.interpolate(
                    logits, size=self.labels.shape[1:], mode="bilinear", align_corners=False
                )
                loss = F.cross_entropy(up.float(), self.labels, ignore_index=255)
                if self.cbp:
                    head = self.model.decode_head.classifier
                    small = F.interpolate(self.labels[:, None].float(), size=logits.shape[2:])
                    feats = head.features.float()
                    loss = loss + torch_occl(feats, small[:, 0].long(), head.w)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self._sync()
        if self.device == "cuda":
            self.memory_mb = max(self.memory_mb, torch.cuda.max_memory_allocated() / 2**20)

    def infer(self):
        self.model.eval()
        with self.torch.inference_mode(), self._autocast():
            self.model(pixel_values=self.images)
        self._sync()


def _FrozenPrototypes(w):  # noqa: N802 (a class factory keeps torch out of module import)
    import torch

    class FrozenPrototypes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", w)

        def forward(self, x):  # (B, C, h, w) -> (B, N, h, w); keeps x for OCCL
            self.features = x
            return torch.einsum("bchw,nc->bnhw", x, self.w)

    return FrozenPrototypes()


def round_robin(variants: dict, method: str, warmup: int, repeats: int) -> dict[str, list]:
    """Times ``method`` of every variant in turn; ``warmup`` untimed rounds first."""
    for _ in range(warmup):
        for v in variants.values():
            getattr(v, method)()
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for k, v in variants.items():
            t = time.perf_counter()
            getattr(v, method)()
            times[k].append(time.perf_counter() - t)
    return times


def spread(ts: list[float]) -> tuple[float, float, float]:
    """(median, 10th percentile, 90th percentile) of timings."""
    p10, p90 = np.percentile(ts, [10, 90])
    return statistics.median(ts), float(p10), float(p90)


def _row(name, ts, batch):
    med, p10, p90 = spread(ts)
    return f"| {name} | {med:.3f} | {p10:.3f}-{p90:.3f} | {p90 / p10:.2f} | {batch / med:.1f} |"


def batch_arrays(batch, size, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    # Blocky labels (8x8 cells) so every class appears in both halves, 5 % ignored.
    cells = rng.integers(0, num_classes, size=(batch, size // 8, size // 8))
    labels = np.kron(cells, np.ones((8, 8), np.int64)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.05] = 255
    return images, labels


def profile_jax_step(variant: JaxVariant, top: int = 25) -> None:
    """Per-op time of the compiled step from a ``jax.profiler`` trace, by HLO op and by kind."""
    compiled = variant.step_fn.lower(variant.state, variant.batch).compile()
    hlo = compiled.as_text()
    info = {}
    for line in hlo.splitlines():
        m = re.match(r"\s+%?(\S+) = (\S+) ", line)
        if m:
            op = re.search(r'op_name="([^"]+)"', line)
            info[m.group(1)] = (m.group(2), op.group(1) if op else "")
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(2):
            variant.step()
        jax.profiler.stop_trace()
        trace = next(Path(d).rglob("*.trace.json.gz"))
        events = json.load(gzip.open(trace))["traceEvents"]
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in info:
            per_op[e["name"]] += e.get("dur", 0) / 2e3  # ms per step
    total = sum(per_op.values())
    kinds = collections.Counter()
    for name, ms in per_op.items():
        op = info[name][1]
        where = "backward" if "transpose(" in op else "forward"
        prim = op.split("/")[-1] if op else name.split(".")[0]
        kinds[f"{where} {re.sub(r'^(jvp|transpose)[(]|[)]+$', '', prim)}"] += ms
    print(f"\nOp time per step, summed over threads: {total:.0f} ms. By kind:\n")
    print("| kind | ms | share |\n|---|---|---|")
    for k, ms in kinds.most_common(top):
        print(f"| {k} | {ms:.1f} | {100 * ms / total:.1f} % |")
    print(f"\nTop {top} ops:\n\n| op | output | ms | source |\n|---|---|---|---|")
    for name, ms in per_op.most_common(top):
        shape, op = info[name]
        print(f"| {name} | `{shape.split('{')[0]}` | {ms:.1f} | `{op[-70:]}` |")


def memory_report(
    name, batch, size, num_classes, dtypes=("float32", "bfloat16"), remats=(False, True)
):
    """XLA's compiled memory analysis of the train step (no run)."""
    print(f"\n{name}, batch {batch}, {size}x{size}: compiled train step memory (XLA analysis)\n")
    print("| compute dtype | remat | arguments (MB) | temporaries (MB) | peak est. (MB) |")
    print("|---|---|---|---|---|")
    images, labels = batch_arrays(batch, size, num_classes)
    for dtype in dtypes:
        for remat in remats:
            config = jax_config(name, num_classes, cbp=True, dtype=dtype, remat=remat)
            abstract = nnx.eval_shape(lambda config=config: model_from_config(config))
            graphdef, params, _ = train_lib.split_model(abstract)
            tx = train_lib.make_optimizer(abstract, params, config.optimizer, 1000)
            state = jax.eval_shape(
                lambda c=config, tx=tx: train_lib.init_state(model_from_config(c), tx)
            )
            step = jax.jit(
                train_lib.make_train_step(graphdef, tx, losses.LossConfig.from_config(config)),
                donate_argnums=0,
            )
            batch_ = {
                "image": jax.ShapeDtypeStruct(images.shape, jnp.float32),
                "label": jax.ShapeDtypeStruct(labels.shape, jnp.int32),
            }
            mem = step.lower(state, batch_).compile().memory_analysis()
            args = mem.argument_size_in_bytes / 2**20
            temp = mem.temp_size_in_bytes / 2**20
            out_extra = (mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**20
            print(
                f"| {dtype} | {remat} | {args:.0f} | {temp:.0f} | {args + temp + out_extra:.0f} |",
                flush=True,
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="B0, batch 8, 256x256, few steps")
    ap.add_argument("--model", default="segformer_b0", choices=sorted(MIT) + sorted(CONVNEXT))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--num-classes", type=int, default=11)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--steps", type=int, default=10, help="timed rounds per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    ap.add_argument("--profile", action="store_true", help="op-level profile of the jax step")
    ap.add_argument("--no-torch", action="store_true", help="cbp_jax rows only")
    ap.add_argument("--memory", action="store_true", help="B5 batch 2 512x512 memory only")
    ap.add_argument("--memory-dtypes", default="float32,bfloat16", help="for --memory")
    ap.add_argument("--memory-no-remat", action="store_true", help="for --memory: skip remat")
    ap.add_argument("--one-device", action="store_true", help="one CPU device for all cores")
    args = ap.parse_args()
    if args.quick:
        args.model, args.batch, args.size, args.steps = "segformer_b0", 8, 256, 15
    if args.memory:
        remats = (False,) if args.memory_no_remat else (False, True)
        memory_report("segformer_b5", 2, 512, 150, tuple(args.memory_dtypes.split(",")), remats)
        return
    chosen = [VARIANTS[k] for k in args.variants.split(",")]
    if args.no_torch:
        chosen = [k for k in chosen if k.startswith("cbp_jax")]

    import torch

    threads = torch.get_num_threads()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    print(
        f"jax {jax.__version__} ({jax.default_backend()}: {jax.devices()[0].device_kind}, "
        f"{jax.device_count()} devices), torch {torch.__version__} ({threads} threads, {gpu}), "
        f"{os.cpu_count()} cores; {args.model}, batch {args.batch}, {args.size}x{args.size}, "
        f"{args.num_classes} classes, {args.dtype}",
        flush=True,
    )
    images, labels = batch_arrays(args.batch, args.size, args.num_classes)
    variants = {}
    for key in chosen:
        t = time.perf_counter()
        if key.startswith("cbp_jax"):
            config = jax_config(args.model, args.num_classes, cbp="CBP" in key, dtype=args.dtype)
            variants[key] = JaxVariant(config, images, labels)
        else:
            variants[key] = TorchVariant(
                args.model, args.num_classes, images, labels, cbp="CBP" in key, dtype=args.dtype
            )
        print(f"{key}: built and compiled in {time.perf_counter() - t:.0f} s", flush=True)
    t0 = time.perf_counter()
    train = round_robin(variants, "step", args.warmup, args.steps)
    print(f"\nTrain step ({args.steps} rounds after {args.warmup} warm-up):\n")
    print("| variant | median (s) | p10-p90 (s) | p90/p10 | images/s | memory (MB) |")
    print("|---|---|---|---|---|---|")
    for k, ts in train.items():
        mb = variants[k].memory_mb
        print(f"{_row(k, ts, args.batch)} {'-' if np.isnan(mb) else f'{mb:.0f}'} |")
    infer_variants = {}  # one row per library: CBP + OCCL where timed, else the learned one
    for library in ("cbp_jax", "PyTorch"):
        keys = [k for k in variants if k.startswith(library)]
        key = next((k for k in keys if "CBP" in k), keys[0] if keys else None)
        if key:
            infer_variants[key] = variants[key]
    infer = round_robin(infer_variants, "infer", 2, max(args.steps, 5))
    print("\nInference, eval-mode forward:\n")
    print("| variant | median (s) | p10-p90 (s) | p90/p10 | images/s |\n|---|---|---|---|---|")
    for k, ts in infer.items():
        print(_row(k, ts, args.batch))
    med = {k: statistics.median(ts) for k, ts in train.items()}
    inf = {k: statistics.median(ts) for k, ts in infer.items()}
    if {"cbp_jax CBP + OCCL", "cbp_jax learned + CE"} <= med.keys():
        overhead = med["cbp_jax CBP + OCCL"] / med["cbp_jax learned + CE"] - 1
        print(f"\ncbp_jax CBP + OCCL overhead over learned + CE: {100 * overhead:+.1f} %")
    if {"PyTorch CBP + OCCL", "PyTorch learned + CE"} <= med.keys():
        t_over = med["PyTorch CBP + OCCL"] / med["PyTorch learned + CE"] - 1
        print(f"PyTorch CBP + OCCL overhead over learned + CE: {100 * t_over:+.1f} %")
    jax_inf = [v for k, v in inf.items() if k.startswith("cbp_jax")]
    torch_inf = [v for k, v in inf.items() if k.startswith("PyTorch")]
    if jax_inf and torch_inf:
        print(f"inference speedup_vs_pytorch: {torch_inf[0] / jax_inf[0]:.2f}")
    print(f"(timed part: {time.perf_counter() - t0:.0f} s)")
    if args.profile:
        profile_jax_step(variants["cbp_jax CBP + OCCL"])
    jax_key = next((k for k in med if k.startswith("cbp_jax")), None)
    if jax_key and "PyTorch learned + CE" in med:
        speedup = med["PyTorch learned + CE"] / med[jax_key]
        print(f"speedup_vs_pytorch: {speedup:.2f}")


if __name__ == "__main__":
    main()
