"""greenprop's C++ CPU ops, built on first use, with PyTorch fallbacks.

ssProp's channel scoring and gather, the row scatter that ssProp and VCAS share
(:func:`greenprop.rows.scatter_rows`) and VCAS's token draw for a Linear's weight gradient
(:func:`greenprop.vcas.samplers.sampled_weight_grad`). ``_channel_ops.cpp`` registers through
``torch.library``: ``greenprop.channel_abs_sum`` (``sum |dy|`` per channel in one read,
no temporary ``|dy|`` tensor), ``greenprop.topk_channels`` (those scores and the top-k
choice in one call), ``greenprop.gather_channels`` (the kept channels of ``dy``, copied
as runs of consecutive channels) and ``greenprop.scatter_rows_`` (kept rows written into
a full-size tensor, every other row zeroed, each byte written once) and
``greenprop.leverage_rows`` (token scores, soft top-k probabilities, Bernoulli draw against
uniform numbers drawn by torch, and the gather and ``1/p`` scale of the kept rows, in one
call instead of some twenty PyTorch ops whose per-op overhead was most of the draw's time). :func:`load`
compiles it once with :func:`torch.utils.cpp_extension.load` (needs a C++ compiler and
ninja; the build is cached in ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``). Where that fails, or with ``GREENPROP_NO_KERNELS=1``,
:func:`load` logs one line and returns False and the callers compute through PyTorch
ops (``abs().sum()``, ``index_select``, ``zeros`` plus ``index_copy_``, the samplers'
draw): the same results (tested), slower. Tensors under :data:`MIN_NUMEL` elements always take the
PyTorch ops (what the ops save there is negligible), so small models and most unit
tests never trigger the build; the token draw's op saves per-call overhead rather than
bandwidth and serves output gradients from :data:`DRAW_MIN_NUMEL` elements on.

Scoring and gathering take a contiguous ``(outer, C, inner)`` view: NCHW ``(N, C, H*W)``,
channels_last and Linear rows ``(rows, C, 1)``; the scatter a contiguous ``(rows, m)``
matrix. They run on CPU tensors only. The build is named after a hash of the source and of
the torch installation, and compiles a copy of the source kept under that hash
(:func:`_build_source`): checkouts with different sources or virtualenvs never rebuild each
other's library, and checkouts with the same source and torch share one (ninja rebuilds
whenever the source's path or the include paths change: 8-9 s of compiling that landed in
the first timed VCAS epoch of preset runs after another checkout had loaded the ops).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "available",
    "channel_abs_sum",
    "gather_channels",
    "leverage_rows",
    "load",
    "scatter_rows_",
    "topk_channels",
    "use_kernels",
]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_channel_ops.cpp")
#: The ops the library must register for :func:`load` to report success.
_OPS = ("channel_abs_sum", "topk_channels", "gather_channels", "scatter_rows_", "leverage_rows")
#: Set to 1 to skip the build and always use the PyTorch ops.
DISABLE_ENV = "GREENPROP_NO_KERNELS"
#: Smaller gradients are scored with PyTorch ops (and do not trigger the build).
MIN_NUMEL = 1 << 16
#: Smaller output gradients are drawn from by the PyTorch ops of :mod:`greenprop.vcas.samplers`.
#: Lower than :data:`MIN_NUMEL`: the op saves per-op overhead, not bandwidth, about 50 us a call
#: (0.3x the PyTorch ops' time) already at 50 tokens x 128 (``benchmarks/vcas_linear.py --draw``,
#: docs/benchmarks.md); below it the unit tests' tiny matrices keep the PyTorch ops and do not
#: trigger the build.
DRAW_MIN_NUMEL = 1 << 12

_lock = threading.Lock()
_state: dict[str, bool] = {}  # "loaded" -> outcome of the one build attempt
_use = [True]  # switched by use_kernels()


def _compile_flags() -> list[str]:
    """-O3, plus the vector ISA this CPU runs PyTorch's own kernels with."""
    flags = ["-O3", "-fopenmp"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def _ninja_on_path() -> None:
    """Put the PyPI ``ninja`` package's binary on PATH when no system ninja is there."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build_source(source: Path = _SOURCE) -> tuple[str, Path]:
    """The build's name and the copy of ``source`` it compiles, at a path that depends only
    on the source's bytes and the torch installation (written once, atomically).

    The installation is part of the key because the build file names its include paths: two
    virtualenvs sharing one build would rebuild it in turn (a CI checkout's, then the
    development one's, 8-9 s of compiling in the next run's first timed epoch).
    """
    text = source.read_bytes()
    installation = f"{torch.__version__}:{Path(torch.__file__).resolve().parent}".encode()
    digest = hashlib.sha256(text + b"\0" + installation).hexdigest()[:12]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    copy = root / "greenprop_sources" / digest / source.name
    if not copy.exists() or copy.read_bytes() != text:
        copy.parent.mkdir(parents=True, exist_ok=True)
        partial = copy.with_name(f"{copy.name}.{os.getpid()}.tmp")
        partial.write_bytes(text)
        partial.replace(copy)
    return f"greenprop_channel_ops_{digest}", copy


def _build() -> None:
    from torch.utils import cpp_extension

    _ninja_on_path()
    name, source = _build_source()
    cpp_extension.load(
        name=name,
        sources=[str(source)],
        extra_cflags=_compile_flags(),
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def load() -> bool:
    """Build (first call) and load the C++ ops; False, after one logged line, where they cannot be."""
    with _lock:
        if "loaded" not in _state:
            if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
                log.warning("greenprop: C++ kernels disabled by %s; using PyTorch ops", DISABLE_ENV)
                _state["loaded"] = False
            else:
                try:
                    _build()
                    _state["loaded"] = all(hasattr(torch.ops.greenprop, op) for op in _OPS)
                except Exception as exc:  # no compiler, no ninja, a failed build: fall back
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    log.warning("greenprop: C++ kernels unavailable (%s); using PyTorch ops", first)
                    _state["loaded"] = False
        return _state["loaded"]


@contextmanager
def use_kernels(enabled: bool) -> Iterator[None]:
    """Inside the block greenprop uses (or, with False, does not use) the C++ ops.

    For side-by-side timing and tests of the PyTorch path; the default is to use them.
    """
    previous, _use[0] = _use[0], enabled
    try:
        yield
    finally:
        _use[0] = previous


def available(t: Tensor, min_numel: int | None = None) -> bool:
    """Whether the C++ ops will serve ``t`` (a CPU floating tensor of at least ``min_numel``, by
    default :data:`MIN_NUMEL`, elements; builds on first call)."""
    least = MIN_NUMEL if min_numel is None else min_numel
    return _use[0] and t.device.type == "cpu" and t.is_floating_point() and t.numel() >= least and load()


def channel_abs_sum(view: Tensor) -> Tensor:
    """float32 ``|view|.sum((0, 2))`` of a contiguous ``(outer, C, inner)`` CPU tensor."""
    return torch.ops.greenprop.channel_abs_sum(view)


def topk_channels(view: Tensor, k: int, groups: int) -> Tensor:
    """Ascending int64 indices of the ``k`` top-scoring channels of each of ``groups`` blocks.

    Scores are :func:`channel_abs_sum` of the contiguous ``(outer, C, inner)`` view; ties go
    to the lower index and NaN ranks highest, as a stable descending sort orders them.
    """
    return torch.ops.greenprop.topk_channels(view, k, groups)


def gather_channels(view: Tensor, idx: Tensor) -> Tensor:
    """``view.index_select(1, idx)`` of a contiguous ``(outer, C, inner)`` CPU tensor, contiguous."""
    return torch.ops.greenprop.gather_channels(view, idx)


def scatter_rows_(out: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
    """``out`` := zeros with ``out[idx] = rows``; both contiguous 2-D CPU tensors of one dtype."""
    return torch.ops.greenprop.scatter_rows_(out, idx, rows)


def leverage_rows(
    dy: Tensor, x: Tensor, uniform: Tensor, k: float, positions: Tensor | None = None
) -> tuple[Tensor, Tensor] | None:
    """The kept tokens' rows of ``(T, out)`` ``dy`` and ``(T, in)`` ``x`` (one dtype), the narrower
    side scaled by ``1/p``: VCAS's soft top-k draw (expected count ``k``) on the leverage scores
    ``||dy_t|| * ||x_t||``, keeping token ``t`` where ``uniform[t] < p_t``.

    ``uniform`` (float32, float64 for float64 rows) holds one number per token, or per position
    of ``positions`` (int64, the tokens the rows are, of ``uniform.numel()``; every other token
    scores zero). None where a score is not finite (nothing drawn).
    """
    dy_k, x_k, finite = torch.ops.greenprop.leverage_rows(dy, x, uniform, k, positions)
    return (dy_k, x_k) if finite else None
