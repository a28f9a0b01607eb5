#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs on this project's GPU check machine, downloaded into .whl/ (git-ignored).
#
# That machine (one H200, no network) has Python 3.12, torch 2.11 + CUDA 13, transformers, peft, accelerate,
# huggingface-hub, safetensors, regex, requests, pillow, httpx, ... but neither diffusers nor torchao. This fetches
# exactly those two as cp312 manylinux wheels, checks that everything they require is already on that machine
# (GPU_IMAGE_HAS below, from the image's package list), prints the size of what travels (working tree + wheels must
# stay under 64 MiB) and the one command line to give the device tool.
#
#   benchmarks/gpu_wheelhouse.sh            # DIFFUSERS_VERSION / TORCHAO_VERSION override the pins
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

DIFFUSERS_VERSION=${DIFFUSERS_VERSION:-0.42.1}  # what CI tests with
TORCHAO_VERSION=${TORCHAO_VERSION:-0.18.0}      # its compiled kernels load on torch >= 2.11
PYTHON=${PYTHON:-python3}
MAX_WHEELS_MIB=50
# The GPU machine's packages that diffusers' and torchao's requirements could name (image 'cuda', 2026-11).
GPU_IMAGE_HAS="filelock huggingface-hub numpy pillow regex requests safetensors httpx packaging pyyaml tqdm
typing-extensions fsspec hf-xet zipp torch transformers peft accelerate"
# diffusers requires importlib_metadata but imports it only on Python < 3.8: not needed there.
NOT_NEEDED="importlib-metadata"

git check-ignore -q .whl/probe.whl || { echo "error: .whl/ is not git-ignored (see .gitignore)" >&2; exit 1; }
rm -rf .whl && mkdir .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "diffusers==$DIFFUSERS_VERSION" "torchao==$TORCHAO_VERSION" 2> >(grep -v "is ignored" >&2)

# Every requirement of the downloaded wheels (extras left out) must be on the GPU machine already.
GPU_IMAGE_HAS="$GPU_IMAGE_HAS" NOT_NEEDED="$NOT_NEEDED" "$PYTHON" - <<'EOF'
import os, re, sys, zipfile
from pathlib import Path

have = set(os.environ["GPU_IMAGE_HAS"].split()) | set(os.environ["NOT_NEEDED"].split())
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
missing = []
for wheel in sorted(Path(".whl").glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(metadata).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                name = norm(re.match(r"Requires-Dist:\s*([A-Za-z0-9_.-]+)", line).group(1))
                if name not in {norm(h) for h in have}:
                    missing.append(f"{wheel.name}: {line}")
if missing:
    sys.exit("not on the GPU machine, and not downloaded:\n" + "\n".join(missing))
print("every requirement of the wheels is on the GPU machine")
EOF

wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
ls -l .whl
echo "wheels: $((wheels / 1024)) KiB; working tree that travels: $((tree / 1024)) KiB; together $(((wheels + tree) / 1024 / 1024)) MiB of 64"
if ((wheels > MAX_WHEELS_MIB * 1024 * 1024)); then
    echo "error: the wheels are over $MAX_WHEELS_MIB MiB" >&2
    exit 1
fi
cat <<'EOF'

Device tool call (carry [".whl"], timeout_s 480):
set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && timeout 420 python3 -m benchmarks.gpu_check --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log
EOF
