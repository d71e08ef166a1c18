"""``create(name)``: build any zoo model from a name plus validated options.

Image classifiers (:data:`MODELS`) take ``(B, C, H, W)`` float images; text models
(:data:`TEXT_MODELS`) take ``(B, 2, L)`` token tensors (ids, attention mask); diffusion
models (:data:`DIFFUSION_MODELS`) take noisy images and timesteps, ``model(x_t, t)``;
causal language models (:data:`LM_MODELS`) take ``(B, L)`` token ids and give next-token
logits ``(B, L, vocabulary)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from torch import nn

from greenprop.errors import GreenpropError
from greenprop.models.activations import ACTIVATIONS
from greenprop.models.cnn import SmallCNN
from greenprop.models.gpt import GPT2Tiny
from greenprop.models.mixer import MLPMixer
from greenprop.models.mlp import MLP
from greenprop.models.resnet import ResNet18
from greenprop.models.unet import DDPMUNet
from greenprop.models.vit import ViT


def _number(value: Any) -> Any:
    """A model-spec string (``cnn:hidden=64``) read as an int or a float; other values as given."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _activation(option: str, value: Any) -> str:
    name = value.strip().lower() if isinstance(value, str) else value
    if name not in ACTIVATIONS:
        raise GreenpropError(f"{option}={value!r}: choose from {', '.join(ACTIVATIONS)}")
    return name


def _positive_int(option: str, value: Any) -> int:
    value = _number(value)
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise GreenpropError(f"{option} must be a positive integer, got {value!r}")
    return int(value)


def _probability(option: str, value: Any) -> float:
    value = _number(value)
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value < 1.0:
        raise GreenpropError(f"{option} must be a number in [0, 1), got {value!r}")
    return float(value)


def _positive_float(option: str, value: Any) -> float:
    value = _number(value)
    if isinstance(value, bool) or not isinstance(value, Real) or not value > 0:
        raise GreenpropError(f"{option} must be a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class _Entry:
    build: Callable[..., nn.Module]  # called with num_classes, in_channels, image_size, ...
    default_width: int
    width_arg: str  # the constructor argument that `width` sets
    options: dict[str, Callable[[str, Any], Any]]  # extra keyword -> validator
    uses_image_size: bool = True
    task: str = "classification"  # what a run of this model learns (greenprop.train.tasks)
    modality: str = "image"  # what its inputs are (greenprop.data.DatasetInfo.modality)


_ENTRIES: dict[str, _Entry] = {
    "mlp": _Entry(MLP, 256, "hidden", {"depth": _positive_int, "activation": _activation}),
    "cnn": _Entry(SmallCNN, 32, "width", {"hidden": _positive_int, "activation": _activation}),
    "resnet18": _Entry(ResNet18, 64, "width", {}, uses_image_size=False),
    "resnet18-narrow": _Entry(ResNet18, 16, "width", {}, uses_image_size=False),
    # GroupNorm instead of BatchNorm: per-sample blocks, which VCAS can sample.
    "resnet18-gn": _Entry(functools.partial(ResNet18, norm="group"), 64, "width", {}, uses_image_size=False),
    "mixer": _Entry(MLPMixer, 128, "dim", {"depth": _positive_int, "patch_size": _positive_int}),
    "vit": _Entry(
        ViT,
        128,
        "dim",
        {
            "depth": _positive_int,
            "heads": _positive_int,
            "mlp_ratio": _positive_float,
            "patch_size": _positive_int,
        },
    ),
    # Noise prediction for DDPM (ssProp's diffusion setting); any side divisible by 4.
    "ddpm-unet": _Entry(DDPMUNet, 16, "width", {}, uses_image_size=False, task="diffusion"),
    # A from-scratch decoder on token ids; num_classes is the vocabulary, image_size the length.
    "gpt2-tiny": _Entry(
        GPT2Tiny,
        128,
        "dim",
        {"depth": _positive_int, "heads": _positive_int, "mlp_ratio": _positive_float},
        task="causal-lm",
        modality="text",
    ),
}


@dataclass(frozen=True)
class _TextEntry:
    build: Callable[..., nn.Module]  # called with dropout, options and (classifiers) num_classes
    options: dict[str, Callable[[str, Any], Any]]
    fixed_width: str  # why `width` does not apply
    task: str = "classification"  # "causal-lm": next-token logits (B, L, vocabulary), no num_classes


def _minilm(**kwargs: Any) -> nn.Module:
    from greenprop.models.hf import MiniLMClassifier  # imports transformers only when used

    return MiniLMClassifier(**kwargs)


def _smollm2(**kwargs: Any) -> nn.Module:
    from greenprop.models.smollm import SmolLM2  # imports transformers only when used

    return SmolLM2(**kwargs)


_TEXT_ENTRIES: dict[str, _TextEntry] = {
    "minilm": _TextEntry(
        _minilm,
        {"encoder_dropout": _probability},
        "it is the pretrained all-MiniLM-L6-v2 (hidden size 384)",
    ),
    "smollm2-135m": _TextEntry(
        _smollm2,
        {"num_layers": _positive_int},
        "it is the pretrained SmolLM2-135M (hidden size 576)",
        task="causal-lm",
    ),
}

#: Image models: (B, C, H, W) float inputs.
MODELS: tuple[str, ...] = tuple(k for k, e in _ENTRIES.items() if e.task == "classification")
#: Diffusion models: ``model(x_t, t)`` predicts the noise in ``x_t`` (B, C, H, W).
DIFFUSION_MODELS: tuple[str, ...] = tuple(k for k, e in _ENTRIES.items() if e.task == "diffusion")
#: Text models: (B, 2, L) token ids and attention mask, e.g. from ``rotten-tomatoes``.
TEXT_MODELS: tuple[str, ...] = tuple(k for k, e in _TEXT_ENTRIES.items() if e.task == "classification")
#: Causal language models: (B, L) token ids -> next-token logits (B, L, vocabulary).
LM_MODELS: tuple[str, ...] = tuple(
    k for entries in (_ENTRIES, _TEXT_ENTRIES) for k, e in entries.items() if e.task == "causal-lm"
)
MODALITIES = ("image", "text")
_INPUTS = {"image": "images", "text": "token ids"}


def create(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    width: int | None = None,
    dropout: float = 0.0,
    modality: str | None = None,
    **options: Any,
) -> nn.Module:
    """Build a freshly initialised model from the zoo.

    Args:
        name: one of :data:`MODELS`, :data:`TEXT_MODELS`, :data:`DIFFUSION_MODELS` or :data:`LM_MODELS`
            (case-insensitive; ``_`` works for ``-``), optionally with options after ``:``
            as in ``--method``:
            ``cnn:activation=tanh,hidden=64`` (the same as passing them in ``options``).
        num_classes: outputs of the final ``head`` Linear (classifiers; a causal
            language model's outputs are its vocabulary, and this is ignored).
        in_channels: image channels (1 for grey, 3 for ``pad_to_32`` data). Ignored by
            text models.
        image_size: side of the square input; mlp, cnn, mixer and vit are built for
            exactly this size, the ResNets accept any size. Ignored by text models
            (minilm takes any length up to 512 tokens).
        width: the model's main width; None uses its default: mlp hidden units (256),
            cnn first conv channels (32, second 2x), resnet18 base channels (64;
            ``resnet18-narrow`` 16), mixer/vit embedding dim (128). Text models have a
            fixed width: anything but None is an error.
        dropout: dropout probability just before ``head`` (0 disables it).
        modality: the data's modality (:attr:`greenprop.data.DatasetInfo.modality`,
            ``"image"`` or ``"text"``); when given, a model built for the other kind
            of input is an error. None skips the check.
        **options: model-specific extras: mlp ``depth`` (2), ``activation``; cnn
            ``hidden`` (128), ``activation`` (relu, sigmoid, tanh or gelu; default relu);
            mixer ``depth`` (4), ``patch_size`` (4 for 16+ pixels, else 2); vit
            ``depth`` (6), ``heads`` (4), ``mlp_ratio`` (2.0), ``patch_size`` (as mixer);
            minilm ``encoder_dropout`` (dropout inside the encoder; default: the
            checkpoint's 0.1); smollm2-135m ``num_layers`` (keep the first decoder
            layers; default all 30).

    Raises:
        GreenpropError: unknown name or option, or an invalid value (named); a text
            model without transformers or its model package (with the install command).
    """
    name, spec_options = parse_model_spec(name)
    options = {**spec_options, **options}
    key = name.strip().lower().replace("_", "-")
    if modality is not None and modality not in MODALITIES:
        raise GreenpropError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    text_entry = _TEXT_ENTRIES.get(key)
    if text_entry is not None:
        return _create_text(key, text_entry, num_classes, width, dropout, modality, options)
    entry = _ENTRIES.get(key)
    if entry is None:
        raise GreenpropError(
            f"unknown model {name!r}; choose one of "
            f"{', '.join(MODELS + TEXT_MODELS + DIFFUSION_MODELS + LM_MODELS)}"
        )
    if modality is not None and modality != entry.modality:
        others = MODELS if modality == "image" else TEXT_MODELS + LM_MODELS
        raise GreenpropError(
            f"model {key!r} takes {_INPUTS[entry.modality]} but the dataset is {modality}; "
            f"{modality} models: {', '.join(others)}"
        )
    kwargs: dict[str, Any] = {
        "num_classes": _positive_int("num_classes", num_classes),
        "in_channels": _positive_int("in_channels", in_channels),
        entry.width_arg: _positive_int("width", entry.default_width if width is None else width),
        "dropout": _dropout(dropout),
    }
    image_size = _positive_int("image_size", image_size)
    if entry.uses_image_size:
        kwargs["image_size"] = image_size
    if key == "cnn" and image_size < 4:
        raise GreenpropError(f"cnn pools twice by 2, so image_size must be >= 4, got {image_size}")
    for option, value in options.items():
        validate = entry.options.get(option)
        if validate is None:
            valid = ", ".join(sorted(entry.options)) or "none"
            raise GreenpropError(f"model {key!r} has no option {option!r} (its extra options: {valid})")
        kwargs[option] = validate(option, value)
    return entry.build(**kwargs)


def task_of(name: str) -> str:
    """What a run of model ``name`` learns: ``"classification"``, ``"diffusion"`` (ddpm-unet)
    or ``"causal-lm"`` (gpt2-tiny, smollm2-135m: next-token prediction)."""
    key = parse_model_spec(name)[0].strip().lower().replace("_", "-")
    entry = _ENTRIES.get(key) or _TEXT_ENTRIES.get(key)
    return entry.task if entry is not None else "classification"


def parse_model_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"cnn:activation=tanh,hidden=64"`` -> ``("cnn", {"activation": "tanh", "hidden": "64"})``."""
    name, _, rest = str(spec).partition(":")
    options: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise GreenpropError(f"model option {item!r} in {spec!r} is not key=value")
            options[key.strip()] = value.strip()
    return name, options


def _create_text(
    key: str,
    entry: _TextEntry,
    num_classes: int,
    width: int | None,
    dropout: float,
    modality: str | None,
    options: dict[str, Any],
) -> nn.Module:
    if modality == "image":
        raise GreenpropError(
            f"model {key!r} takes tokenised text but the dataset is images; image models: {', '.join(MODELS)}"
        )
    if width is not None:
        raise GreenpropError(f"model {key!r} has a fixed width ({entry.fixed_width}): drop width={width!r}")
    kwargs: dict[str, Any] = {"dropout": _dropout(dropout)}
    if entry.task == "classification":  # a language model's outputs are its vocabulary
        kwargs["num_classes"] = _positive_int("num_classes", num_classes)
    for option, value in options.items():
        validate = entry.options.get(option)
        if validate is None:
            valid = ", ".join(sorted(entry.options)) or "none"
            raise GreenpropError(f"model {key!r} has no option {option!r} (its extra options: {valid})")
        kwargs[option] = validate(option, value)
    return entry.build(**kwargs)


def _dropout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value < 1.0:
        raise GreenpropError(f"dropout must be a number in [0, 1), got {value!r}")
    return float(value)
