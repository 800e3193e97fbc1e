#!/usr/bin/env bash
# flatopt inside the trainers that own the training loop: transformers.Trainer, TRL's
# SFTTrainer, pytorch-lightning (and its Fabric) and Accelerate, in their own virtual
# environment. Runs on a clean checkout; the pins are in constraints/trainers.txt. Caches stay
# in the repo; nothing is downloaded from a model hub (the tests build their models from configs).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export PIP_CACHE_DIR="$PWD/.venv-cache/pip" XDG_CACHE_HOME="$PWD/.venv-cache"
export HF_HOME="$PWD/.venv-cache/huggingface" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
start=$SECONDS

echo "== trainers: a fresh venv, torch 2.13.0 (CPU) first, then the pinned frameworks"
rm -rf .venv-trainers
python3 -m venv .venv-trainers
.venv-trainers/bin/pip install -q torch==2.13.0
.venv-trainers/bin/pip install -q -c constraints/trainers.txt -e ".[dev]" \
  transformers peft trl accelerate pytorch-lightning datasets
.venv-trainers/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
.venv-trainers/bin/python -m pip list 2>/dev/null \
  | grep -iE "^(torch|transformers|peft|trl|accelerate|pytorch-lightning|datasets) "

echo "== trainers: tests (venv built in $((SECONDS - start)) s)"
.venv-trainers/bin/python -m pytest -p no:cacheprovider tests/integrations/test_trainers.py

echo "== trainers: examples, smoke size (at $((SECONDS - start)) s)"
for script in examples/trainers/*.py; do
  echo "-- $script"
  .venv-trainers/bin/python "$script" --smoke
done

echo "== trainers finished in $((SECONDS - start)) s"
