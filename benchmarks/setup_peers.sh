#!/usr/bin/env bash
# Create benchmarks/.peers: a separate venv with the peer libraries (sae-lens, eai-sparsify, dictionary-learning)
# for benchmarks/bench_step.py. torch stays pinned to the project's CPU build through
# constraints.txt; torchvision (pulled by some peers) is removed because it breaks
# `import transformers` against this torch.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="$here/.peers"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -c "$root/constraints.txt" "torch==2.13.0"
"$venv/bin/python" -m pip install -c "$root/constraints.txt" sae-lens eai-sparsify dictionary-learning
# interop tests run saekit itself in this venv (TransformerLens / nnsight sources, SAELens's
# synthetic models in `saekit bench`, whose plot needs matplotlib)
"$venv/bin/python" -m pip install -c "$root/constraints.txt" nnsight matplotlib
if "$venv/bin/python" -m pip show torchvision >/dev/null 2>&1; then
  "$venv/bin/python" -m pip uninstall -y torchvision
fi
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch
for name in ("sae-lens", "eai-sparsify", "dictionary-learning", "transformer-lens", "nnsight",
             "matplotlib", "transformers"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
print("torch", torch.__version__)
PY
