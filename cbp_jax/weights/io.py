"""Reading PyTorch checkpoints into NumPy: safetensors, torch pickles (weights only unless
trusted), sharded HF folders, and Hugging Face hub ids."""

from __future__ import annotations

import json
import os
import re

import numpy as np

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def _hub_id(path: str) -> bool:
    """'owner/name' that is not a local path; 'weights/x.pth' is a (missing) file, not an id."""
    return (
        bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path))
        and not path.endswith(CHECKPOINT_SUFFIXES)
        and not os.path.exists(path)
    )


def _download(repo_id: str) -> str:
    try:
        import huggingface_hub
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with transformers
        raise RuntimeError(
            f"{repo_id!r} looks like a Hugging Face hub id but huggingface_hub is not installed: "
            "`pip install huggingface_hub`, or pass the path of a local checkpoint file."
        ) from e
    errors = []
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return huggingface_hub.hf_hub_download(repo_id, filename)
        except Exception as e:  # noqa: BLE001 - reported below, with the fix
            errors.append(f"{filename}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            if type(e).__name__ not in ("RemoteEntryNotFoundError", "EntryNotFoundError"):
                break  # offline, or no such repo: the second file would fail the same way
    raise RuntimeError(
        f"Could not download {repo_id!r} from the Hugging Face hub (offline, or no such repo?).\n  "
        + "\n  ".join(errors)
        + f"\nFix: on a machine with network, download model.safetensors (or pytorch_model.bin) "
        f"from https://huggingface.co/{repo_id} (e.g. `huggingface-cli download {repo_id} "
        "model.safetensors`), copy it here and pass its local path: "
        "load_pretrained(model, '/path/to/model.safetensors')."
    )


def _torch_load(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(
            f"Reading {path!r} (a PyTorch pickle) needs torch: `pip install torch` (the CPU wheel "
            "is enough), or convert the file to .safetensors elsewhere."
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        if not trust_pickle and "Unsupported global" in str(e):  # a real pickle, with objects
            raise ValueError(
                f"{path!r} pickles objects other than tensors (e.g. mmengine training "
                "metadata), which torch.load(weights_only=True) refuses. If you trust the "
                "file, pass trust_pickle=True (in a run: --config.trust_pickle=True; it runs "
                "the file's pickle code), or re-save only its state_dict."
            ) from e
        raise ValueError(
            f"{path!r} is not a valid PyTorch checkpoint (torch.load: "
            f"{_first_line(e)}). Is it truncated or another kind of file? Download it again "
            "or pass another file."
        ) from e
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict.")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).numpy()
    return out


def _first_line(error: Exception) -> str:
    """The first line of ``error``'s message that is not torch's generic weights_only advice."""
    generic = ("weights_only", "Weights only load failed", "Check the documentation")
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    detail = [x for x in lines if not any(g in x for g in generic)]
    return (detail or [type(error).__name__])[0][:200]


def _safetensors_load(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError

    try:
        return _safetensors_read(path)
    except SafetensorError as e:
        raise ValueError(
            f"{path!r} is not a valid safetensors file ({e}); it may be truncated. Download "
            "it again or pass another file."
        ) from e


def _safetensors_read(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(path, framework="np") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                out[k] = f.get_tensor(k)
    except (TypeError, ValueError):  # bfloat16 has no NumPy dtype: go through torch
        import torch
        from safetensors.torch import load_file

        out = {k: v.to(torch.float32).numpy() for k, v in load_file(path).items()}
    return out


def read_state_dict(
    path: str | os.PathLike, *, trust_pickle: bool = False
) -> tuple[dict[str, np.ndarray], str]:
    """Reads a checkpoint into NumPy arrays; returns (state dict, resolved file path).

    Accepts a ``.safetensors`` / ``.bin`` / ``.pth`` / ``.pt`` file, an HF ``save_pretrained``
    folder (``model.safetensors``, sharded safetensors, or ``pytorch_model.bin``) or a hub id.
    """
    path = os.fspath(path)
    if _hub_id(path):
        path = _download(path)
    if os.path.isdir(path):
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(
                f"{path!r} is a folder without model.safetensors, model.safetensors.index.json "
                "or pytorch_model.bin; pass the checkpoint file itself."
            )
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Checkpoint {path!r} does not exist (pass a file, an HF folder, or a hub id like "
            "'nvidia/mit-b0')."
        )
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for shard in shards:
            sd.update(_safetensors_load(os.path.join(os.path.dirname(path), shard)))
        return sd, path
    if path.endswith(".safetensors"):
        return _safetensors_load(path), path
    return _torch_load(path, trust_pickle), path
