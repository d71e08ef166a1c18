"""Loading pretrained zoo models: quietly when asked, and once per process.

Two things a run needs when it builds a model from a large file:

- **Progress.** Whether loading may draw a progress bar follows the run's
  ``--no-progress`` (``TrainConfig.progress``); :func:`load_progress` sets it for the
  models built inside it (:func:`greenprop.train.setup.create_model` does), and
  :func:`progress_shown` tells a loader. A context variable, so no argument has to pass
  through the zoo's constructors.
- **Reuse.** ``compare`` builds the same model for every method, epoch slice and check;
  reading and dequantising SmolLM2's GGUF file takes ~20 s of CPU each time.
  :class:`TemplateCache` keeps the last loaded model as a template and hands out deep
  copies, so runs never share a parameter, and it holds one template at most, so memory
  stays bounded by one extra model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar

from torch import nn

__all__ = ["TemplateCache", "load_progress", "progress_shown"]

_PROGRESS: ContextVar[bool] = ContextVar("greenprop_load_progress", default=True)


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


class TemplateCache:
    """At most one loaded model, kept as a template; callers get independent deep copies.

    ``get(key, load)`` returns a copy of the template stored under ``key``, calling
    ``load()`` first when the key differs from the stored one (which is then dropped). The
    key must name everything the loaded model depends on (file, its size and mtime, dtype,
    slice). A deep copy keeps parameters tied inside the copy (as the original had them) and
    shares nothing with the template or other copies.
    """

    def __init__(self) -> None:
        self._key: Hashable | None = None
        self._template: nn.Module | None = None
        self.loads = 0  # how many times ``load`` ran (what the cache saves is visible)

    def get(self, key: Hashable, load: Callable[[], nn.Module]) -> nn.Module:
        if self._template is None or self._key != key:
            self.clear()  # free the old template before loading the new one
            self._template = load()
            self._key = key
            self.loads += 1
        return copy.deepcopy(self._template)

    def clear(self) -> None:
        """Drop the template (its memory is freed once no copy is being made from it)."""
        self._key, self._template = None, None
