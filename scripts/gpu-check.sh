#!/usr/bin/env bash
# Everything of issue 8 that needs a GPU, in one call of at most 8 minutes, on a host with
# Python 3.12 + a CUDA build of torch and no Swift toolchain and no network. It runs from
# the repository root with the folder scripts/gpu-bundle.sh made (git-ignored, carried along):
#
#   scripts/gpu-check.sh [--bundle DIR] [--dry-run]
#
#   1. unpacks the bundled lycoris-server and the Python wheels the host lacks (into a
#      temporary folder; python/ and that folder go on PYTHONPATH)
#   2. prints the GPU, torch and the server's `initialize` capabilities
#   2b. lycoris-server --device-check cuda:0: the device backend's m·ΔW and ∂parameters
#      against the host engine, every ported algorithm, one line per case; then
#      --device-bench cuda:0: its time per SD 1.5 layer shape (LoRA, LoHa, LoKr)
#   3. pytest: python/tests/test_cuda*.py (the CUDA staging path, the server's CUDA probe, the
#      backend's kernels compiled by NVRTC and launched with the driver API against torch, and
#      test_cuda_device.py: the device path — torch's tensors shared by CUDA IPC, two server
#      calls per step — against LyCORIS, the stream-ordering rule, the fallback, a kohya step)
#   4. bench/train_step.py --device cuda: a kohya training step on an SD 1.5-shaped UNet + CLIP
#      (random weights, 64x64 latents, batch 1 and 4; LoRA, LoHa, LoKr), swift_lycoris.kohya
#      (the device path, which swift_lycoris picks by itself for a model on the GPU; the log
#      line "the adapters compute on cuda:0" or "stay on the arena path: <why>" says which)
#      against lycoris.kohya on the same GPU, every figure printed
#
# --dry-run does the same on a machine without a GPU, in minutes: the bundled server, the
# wheel step, the tests (which report themselves skipped without CUDA) and the benchmark on
# the CPU with the tiny models. Exit status 1 when a phase failed or ran out of its time.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUNDLE=$ROOT/gpu-bundle
DRY=0
while [ $# -gt 0 ]; do
    case $1 in
        --bundle) BUNDLE=$(realpath -m "$2"); shift 2 ;;
        --dry-run) DRY=1; shift ;;
        *) echo "usage: $0 [--bundle DIR] [--dry-run]" >&2; exit 64 ;;
    esac
done
PYTHON=${PYTHON:-python3}
STARTED=$(date +%s)
FAILED=()

phase() { echo; echo "=== $1 ($(( $(date +%s) - STARTED )) s)"; }
# The phases' limits (45 + 40 + 40 + 120 + 230 s) keep the GPU run under 8 minutes with the
# unpack; the benchmark runs LyCORIS's default (rebuild) mode only, the issue's figure.
# run NAME SECONDS COMMAND…: runs the command with a time limit and records a failure.
run() {
    local name=$1 limit=$2; shift 2
    timeout --kill-after=10 "$limit" "$@"
    local status=$?
    if [ $status -eq 124 ] || [ $status -eq 137 ]; then
        echo "gpu-check: $name ran out of its $limit s"; FAILED+=("$name (timeout)")
    elif [ $status -ne 0 ]; then
        echo "gpu-check: $name exited with $status"; FAILED+=("$name")
    fi
}

for file in server.tar.xz wheels.tar.xz; do
    [ -f "$BUNDLE/$file" ] || { echo "gpu-check: $BUNDLE/$file is missing: run scripts/gpu-bundle.sh first" >&2; exit 1; }
done
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

phase "unpack"
cat "$BUNDLE/MANIFEST" 2>/dev/null | head -1
# Python's tarfile rather than tar -J: the host may have no xz.
"$PYTHON" - "$BUNDLE" "$WORK" <<'EOF' || { echo "gpu-check: the bundle does not unpack" >&2; exit 1; }
import sys, tarfile
for name in ("server.tar.xz", "wheels.tar.xz"):
    with tarfile.open(f"{sys.argv[1]}/{name}") as archive:
        archive.extractall(sys.argv[2], filter="tar")
EOF
"$PYTHON" "$ROOT/scripts/gpu_wheels.py" install "$WORK/wheels" "$WORK/site" || exit 1
export PYTHONPATH=$WORK/site:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}
export LYCORIS_SERVER=$WORK/lycoris-server/bin/lycoris-server
export PYTHONDONTWRITEBYTECODE=1

phase "environment"
if [ "$DRY" = 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || FAILED+=("nvidia-smi")
fi
run "environment" 45 "$PYTHON" - <<'EOF'
import json, platform, torch, swift_lycoris
from swift_lycoris.server import Server
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available: {torch.cuda.is_available()}, swift_lycoris from {swift_lycoris.__file__}")
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0))
from swift_lycoris.cuda_libraries import torch_library_dirs
server = Server(cuda_library_dirs=torch_library_dirs())
capabilities = dict(server.info["capabilities"])
cuda = capabilities.pop("cuda")
print("server initialize capabilities:", json.dumps(capabilities))
print("server CUDA probe:", json.dumps(cuda, indent=1))
server.close()
EOF

phase "device check (lycoris-server --device-check)"
# The dry run checks the emulated device (no driver here); the GPU run checks cuda:0.
DEVICE=cuda:0
[ "$DRY" = 1 ] && DEVICE=emulated
mapfile -t LIBRARY_DIRS < <("$PYTHON" -c 'from swift_lycoris.cuda_libraries import torch_library_dirs
for d in torch_library_dirs(): print("--cuda-library-dir"); print(d)')
run "device check" 40 "$LYCORIS_SERVER" --device-check "$DEVICE" "${LIBRARY_DIRS[@]}"
# The emulated device runs kernels one thread at a time: its timings would take minutes and mean nothing.
[ "$DRY" = 0 ] && run "device bench" 40 "$LYCORIS_SERVER" --device-bench "$DEVICE" "${LIBRARY_DIRS[@]}"

phase "tests (python/tests/test_cuda*.py)"
run "pytest" 120 "$PYTHON" -m pytest -q -p no:cacheprovider -rs "$ROOT"/python/tests/test_cuda*.py

phase "benchmark (bench/train_step.py)"
# swift_lycoris's INFO lines (which path the adapters take) reach stderr, not the server's.
if [ "$DRY" = 0 ]; then
    run "train_step" 230 "$PYTHON" -c 'import logging, runpy, sys; logging.basicConfig(level=logging.WARNING); logging.getLogger("swift_lycoris").setLevel(logging.INFO); logging.getLogger("swift_lycoris.server").setLevel(logging.WARNING); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")' "$ROOT/bench/train_step.py" --device cuda --model sd15 --latent 64 \
        --algos lora,loha,lokr --batches 1,4 --modes default --threads 16 --warmup 1 --steps 5 --min-steps 2 --case-seconds 11
else
    run "train_step" 240 "$PYTHON" "$ROOT/bench/train_step.py" --device cpu --model tiny --quick \
        --algos lora,loha,lokr --batches 1 --modes default --threads 1
fi

phase "done"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu-check: FAILED: ${FAILED[*]}"
    exit 1
fi
echo "gpu-check: every phase passed"
