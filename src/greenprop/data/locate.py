"""Find the Fashion-MNIST IDX files on disk; we never download at run time.

Lookup order: an explicit ``data_dir``; else ``$GREENPROP_DATA``, then the Debian
package's folder (``/usr/share/datasets/fashion-mnist``), then ``./data`` (where
torchvision puts ``FashionMNIST/raw``). Each candidate is accepted if the four files
are directly in it or in ``<dir>/FashionMNIST/raw``, raw or ``.gz``.
"""

from __future__ import annotations

import os
from pathlib import Path

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
