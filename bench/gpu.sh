#!/usr/bin/env bash
# Issue 8's GPU section in one go: bfloat16 train/inference speed and memory of SegFormer-B0,
# SegFormer-B5 and UperNet-ConvNeXt-B at 512x512 against PyTorch on the same GPU, then the
# depthwise/1x1/patchify conv formulations, the banded CE's band size and the compiled memory
# of the B5 step at batch 2.
#
#     bash bench/gpu.sh LOGDIR [SECONDS]
#
# Each part runs under its own time limit (SECONDS in all, default 560) and writes
# LOGDIR/<part>.txt, so a slow compile in one part leaves the others' figures. JAX gets half
# of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION), PyTorch the rest.
set -u
out=${1:?usage: bash bench/gpu.sh LOGDIR [SECONDS]}
budget=${2:-560}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
start=$SECONDS
py=${PYTHON:-python3}
common=(--size 512 --num-classes 150 --dtype bfloat16 --one-device)

part() {  # part NAME LIMIT CMD...: runs CMD with at most LIMIT seconds (and what is left)
  local name=$1 limit=$2 left=$((budget - (SECONDS - start)))
  shift 2
  ((left < limit)) && limit=$left
  if ((limit < 20)); then echo "== $name: skipped, time is up" | tee "$out/$name.txt"; return 1; fi
  echo "== $name (limit ${limit} s): $*" | tee "$out/$name.txt"
  timeout "$limit" "$@" 2>&1 | grep -v -e "^WARNING" -e "^W[0-9]" | tee -a "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s in all" | tee -a "$out/$name.txt"
  return "$rc"
}

nvidia-smi -L | tee "$out/device.txt"
$py -c "import jax, flax, optax, orbax.checkpoint as o, torch, transformers as t
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__,
      'torch', torch.__version__, 'transformers', t.__version__)" 2>&1 | tee -a "$out/device.txt"
part b0 150 $py bench/train_step.py --model segformer_b0 --batch 8 "${common[@]}" || exit 1
part b5 220 $py bench/train_step.py --model segformer_b5 --batch 8 "${common[@]}" \
  --steps 8 --variants jax-cbp-occl,torch-ce
part convnext_b 150 $py bench/train_step.py --model upernet_convnext_base --batch 8 \
  "${common[@]}" --steps 8 --variants jax-cbp-occl,torch-ce
part formulations 60 $py bench/models.py --formulations --dtype bfloat16 --repeats 20
part ce_bands 60 $py bench/models.py --ce-bands --repeats 10
part memory_b5 200 $py bench/train_step.py --memory --memory-dtypes bfloat16,float32 --memory-no-remat
