"""XLA compilations: JAX's persistent compilation cache and a count of the real compiles.

A run's compiled programs are written to a cache folder (by default inside the workdir), so
a rerun -- a resume, ``eval.py`` after training, a second evaluation -- loads them instead
of compiling again (minutes for a SegFormer-B5 step on a GPU host).
"""

import os

import jax

from cbp_jax import storage

_COMPILE = "/jax/core/compile/backend_compile_duration"  # fires for compiles and cache loads
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_counts = {"backend_compiles": 0, "cache_hits": 0}


def _on_duration(event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event == _COMPILE:
        _counts["backend_compiles"] += 1


def _on_event(event: str, **kwargs) -> None:
    del kwargs
    if event == _CACHE_HIT:
        _counts["cache_hits"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)
jax.monitoring.register_event_listener(_on_event)


def compiled() -> int:
    """XLA programs compiled by this process so far (persistent-cache loads not counted)."""
    return _counts["backend_compiles"] - _counts["cache_hits"]


def loaded_from_cache() -> int:
    """XLA programs this process loaded from the persistent compilation cache so far."""
    return _counts["cache_hits"]


def cache_dir(setting: str, workdir: str) -> str:
    """The cache folder of ``config.compilation_cache``: ``"workdir"`` ->
    ``<workdir>/compilation_cache``, ``""`` -> none (off), anything else is the path (a
    local folder or a ``gs://`` URL)."""
    if setting == "workdir":
        return os.fspath(storage.path(workdir) / "compilation_cache")
    return setting


def enable_persistent_cache(path: str) -> None:
    """Caches every compiled XLA program in ``path``, however fast it compiled, so that a
    rerun compiles nothing it compiled before. ``""`` changes nothing (the cache stays off
    unless JAX was told otherwise, e.g. by ``JAX_COMPILATION_CACHE_DIR``). JAX reads and
    writes a ``gs://`` cache through etils.epath, and only process 0 writes."""
    if not path:
        return
    from jax.experimental.compilation_cache import compilation_cache

    folder = storage.resolve(path)
    folder.mkdir(parents=True, exist_ok=True)  # nothing to make in an object store
    path = os.fspath(folder)
    if jax.config.jax_compilation_cache_dir not in (None, "", path):
        compilation_cache.reset_cache()  # a second run in this process, in another workdir
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
