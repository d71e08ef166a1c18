#!/usr/bin/env bash
# Installs the offline Fashion-MNIST files (Debian package dataset-fashion-mnist).
# Nothing is downloaded at training time; this is the only place data is fetched.
set -euo pipefail
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ] && [ -f "$DIR/t10k-labels-idx1-ubyte.gz" ]; then
  exit 0
fi
if [ -n "${GREENPROP_DATA:-}" ] && [ -d "$GREENPROP_DATA" ]; then
  echo "Fashion-MNIST: using GREENPROP_DATA=$GREENPROP_DATA"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "Fashion-MNIST is missing: run 'apt-get install dataset-fashion-mnist' as root," >&2
    echo "or set GREENPROP_DATA to a folder holding the four *-ubyte.gz files." >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "Fashion-MNIST is missing and apt-get is not available: set GREENPROP_DATA to a" >&2
  echo "folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz," >&2
  echo "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz." >&2
  exit 1
fi
echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)..."
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
