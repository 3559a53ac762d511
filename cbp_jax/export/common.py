"""What every export target shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


class MissingDependencyError(RuntimeError):
    """An optional package an export needs is not installed (the message says which)."""


@dataclasses.dataclass(frozen=True)
class Request:
    """What ``export.py`` asks of a target.

    Attributes:
      out: the file or folder to write (local or ``gs://``).
      size_hw: fixed input (H, W) for targets that need one (None: ``config.data.crop_size``).
      platforms: ``--to jax``'s lowering platforms (None: the current backend's).
      fp16: ``--to onnx``: float16 weights and compute, float32 output.
    """

    out: str
    size_hw: tuple[int, int] | None = None
    platforms: Sequence[str] | None = None
    fp16: bool = False
