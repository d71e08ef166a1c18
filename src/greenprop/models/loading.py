"""Loading pretrained zoo models: quietly when asked, and once per process.

Two things a run needs when it builds a model from a large file:

- **Progress.** Whether loading may draw a progress bar follows the run's
  ``--no-progress`` (``TrainConfig.progress``); :func:`load_progress` sets it for the
  models built inside it (:func:`greenprop.train.setup.create_model` does), and
  :func:`progress_shown` tells a loader. A context variable, so no argument has to pass
  through the zoo's constructors.
- **Reuse.** ``compare`` builds the same model for every method, epoch slice and check;
  reading and dequantising SmolLM2's GGUF file takes ~20 s of CPU each time. Inside
  :func:`keep_loaded` (``compare`` and ``advise`` run in one), a :class:`TemplateCache`
  keeps the last loaded model as a template and hands out deep copies, so runs never
  share a parameter; it holds one template at most, freed when the block ends, so memory
  stays bounded by one extra model. Outside such a block (``train``, a plain
  ``load_smollm2()``) nothing is kept: a process that builds its model once does not carry
  a second copy through its run (nor into its measured peak memory).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar

from torch import nn

__all__ = ["TemplateCache", "keep_loaded", "load_progress", "progress_shown"]

_PROGRESS: ContextVar[bool] = ContextVar("greenprop_load_progress", default=True)
_KEEP: ContextVar[bool] = ContextVar("greenprop_keep_loaded", default=False)
_CACHES: list[TemplateCache] = []  # every cache made, so that keep_loaded can empty them


@contextlib.contextmanager
def load_progress(shown: bool) -> Iterator[None]:
    """Within this block, model loaders draw progress (bars, a loading line) only if ``shown``."""
    token = _PROGRESS.set(bool(shown))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def progress_shown() -> bool:
    """Whether a loader may draw progress now (True outside any :func:`load_progress`)."""
    return _PROGRESS.get()


@contextlib.contextmanager
def keep_loaded() -> Iterator[None]:
    """Within this block, models loaded through a :class:`TemplateCache` are read once and
    copied; when the outermost block ends, the kept templates are freed."""
    outermost = not _KEEP.get()
    token = _KEEP.set(True)
    try:
        yield
    finally:
        _KEEP.reset(token)
        if outermost:
            for cache in _CACHES:
                cache.clear()


class TemplateCache:
    """At most one loaded model, kept as a template inside :func:`keep_loaded`; callers get
    independent deep copies.

    ``get(key, load)`` returns a copy of the template stored under ``key``, calling
    ``load()`` first when the key differs from the stored one (which is then dropped). The
    key must name everything the loaded model depends on (file, its size and mtime, dtype,
    slice). A deep copy keeps parameters tied inside the copy (as the original had them) and
    shares nothing with the template or other copies. Outside :func:`keep_loaded`, ``get``
    returns ``load()`` itself and keeps nothing.
    """

    def __init__(self) -> None:
        self._key: Hashable | None = None
        self._template: nn.Module | None = None
        self.loads = 0  # how many times ``load`` ran (what the cache saves is visible)
        _CACHES.append(self)

    def get(self, key: Hashable, load: Callable[[], nn.Module]) -> nn.Module:
        if not _KEEP.get():
            self.loads += 1
            return load()
        if self._template is None or self._key != key:
            self.clear()  # free the old template before loading the new one
            self._template = load()
            self._key = key
            self.loads += 1
        return copy.deepcopy(self._template)

    def clear(self) -> None:
        """Drop the template (its memory is freed once no copy is being made from it)."""
        self._key, self._template = None, None
