#!/usr/bin/env bash
# The built-in adapters against the real LoRA libraries, each set in its own virtual environment
# (torchtune 0.6.1 needs an older torchao, and litgpt a huggingface-hub that transformers 5 does
# not accept). Runs on a clean checkout; the pins are in constraints/. Caches stay in the repo.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export PIP_CACHE_DIR="$PWD/.venv-cache/pip" XDG_CACHE_HOME="$PWD/.venv-cache"
export HF_HOME="$PWD/.venv-cache/huggingface" HF_HUB_OFFLINE=1
start=$SECONDS

# venv NAME CONSTRAINTS EXTRAS PACKAGES...: a fresh venv, torch 2.13.0 (CPU) first, then
# flatopt with EXTRAS and the packages, under constraints that pin torch too, so pip can never
# swap in another torch build.
venv() {
  local name=$1 constraints=$2 extras=$3
  shift 3
  rm -rf "$name"
  python3 -m venv "$name"
  "$name/bin/pip" install -q torch==2.13.0
  "$name/bin/pip" install -q -c "$constraints" -e ".[$extras]" "$@"
  "$name/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
}

echo "== integrations: peft + transformers, loralib, minLoRA-style parametrize"
venv .venv-integrations constraints/integrations.txt dev,integrations,trainers
.venv-integrations/bin/python -m pip list 2>/dev/null \
  | grep -iE "^(torch|peft|transformers|loralib|trl|accelerate|pytorch-lightning|datasets) "
.venv-integrations/bin/python -m pytest -p no:cacheprovider \
  tests/integrations/test_peft.py tests/integrations/test_loralib.py \
  tests/integrations/test_parametrize.py

echo "== trainers that own the loop: HF Trainer, TRL, Lightning, Accelerate (auto=True)"
HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1 .venv-integrations/bin/python -m pytest -p no:cacheprovider \
  tests/integrations/test_trainers.py
for script in examples/trainers/*.py; do
  echo "-- $script"
  HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1 .venv-integrations/bin/python "$script" --smoke
done

echo "== integrations: the docs pages whose blocks need peft, transformers or accelerate"
# The main suite skips those blocks (and says so); here their needs must be met.
FLATOPT_DOCS_REQUIRE="peft transformers accelerate" .venv-integrations/bin/python -m pytest \
  -p no:cacheprovider tests/test_docs.py -k "peft.md or troubleshooting.md"

echo "== integrations: torchtune + torchao (also sharded by its shard_model, FSDP2), litgpt"
venv .venv-tt constraints/torchtune-litgpt.txt dev torchtune torchao litgpt
.venv-tt/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|torchtune|torchao|litgpt) "
.venv-tt/bin/python -m pytest -p no:cacheprovider \
  tests/integrations/test_torchtune.py tests/integrations/test_torchtune_fsdp.py \
  tests/integrations/test_litgpt.py

echo "== integrations: DeepSpeed ZeRO-1/2/3 on 2 gloo CPU ranks (one spawn for every case)"
# DS_BUILD_OPS=0: no op is compiled at install; the first run builds a communication op (cached).
# transformers, accelerate and peft: the HF Trainer and Accelerate's plugin over DeepSpeed.
DS_BUILD_OPS=0 venv .venv-ds constraints/deepspeed.txt dev deepspeed transformers accelerate peft
.venv-ds/bin/python -m pip list 2>/dev/null \
  | grep -iE "^(torch|deepspeed|transformers|accelerate|peft) "
HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1 .venv-ds/bin/python -m pytest -p no:cacheprovider \
  tests/integrations/test_deepspeed.py
for script in examples/recipes/deepspeed_*.py; do
  echo "-- $script"
  .venv-ds/bin/python "$script" --smoke
done
echo "-- benchmarks/_zero_memory.py (smoke; it measures, it asserts nothing)"
.venv-ds/bin/python benchmarks/_zero_memory.py --smoke --out "$(mktemp -d)/zero_memory.json"

echo "== integrations finished in $((SECONDS - start)) s"
