#!/usr/bin/env bash
# Check mlx-relay on an NVIDIA GPU, by hand: MLX's CUDA backend is the default device, the
# bundled model runs through a real 2-worker pipeline (`mlx-relay up`) with the same greedy
# tokens as one process (`mlx-relay generate`), each stage reports backend=cuda, and NVML
# reads the GPU while it works.
#
#   scripts/gpu_check.sh            # from the repository root; exit 0 = every check passed
#
# It installs mlx[cuda] (the same MLX version) and nvidia-ml-py into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no working nvidia-smi here: this machine has no usable NVIDIA GPU" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

[ -x .venv/bin/python ] || make setup
MLX_VERSION=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('mlx'))")
.venv/bin/pip install --quiet "mlx[cuda]==${MLX_VERSION}" "nvidia-ml-py>=12.535"

PORT=${PORT:-18480}
PROMPT="What is the capital of France?"
TOKENS=16
WORK=$(mktemp -d)
UP_PID=""
cleanup() {
    if [ -n "$UP_PID" ] && kill -0 "$UP_PID" 2>/dev/null; then
        kill -INT "$UP_PID"
        wait "$UP_PID" || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== MLX backend"
.venv/bin/python - <<'EOF'
import mlx.core as mx

from mlx_relay.model.backend import backend_name

print(f"mlx {mx.__version__}: default device {mx.default_device()}, backend {backend_name()}")
assert backend_name() == "cuda", "MLX does not compute on the GPU: is mlx-cuda-12 installed?"
EOF

echo "== single process (mlx-relay generate)"
.venv/bin/mlx-relay generate "$PROMPT" --max-tokens "$TOKENS" | tee "$WORK/single.txt"

echo "== 2-stage pipeline (mlx-relay up)"
.venv/bin/mlx-relay up --workers 2 --port "$PORT" >"$WORK/up.log" 2>&1 &
UP_PID=$!
for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1 && break
    kill -0 "$UP_PID" 2>/dev/null || { cat "$WORK/up.log"; exit 1; }
    sleep 0.5
done

PORT=$PORT PROMPT=$PROMPT TOKENS=$TOKENS WORK=$WORK .venv/bin/python - <<'EOF'
import os
import threading
import time

import httpx
import pynvml

base = f"http://127.0.0.1:{os.environ['PORT']}"
pynvml.nvmlInit()
handle = pynvml.nvmlDeviceGetHandleByIndex(0)
samples: list[tuple[int, int]] = []
done = threading.Event()


def sample() -> None:
    while not done.is_set():
        rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
        samples.append((rates.gpu, pynvml.nvmlDeviceGetMemoryInfo(handle).used))
        time.sleep(0.05)


sampler = threading.Thread(target=sample)
sampler.start()
body = {
    "messages": [{"role": "user", "content": os.environ["PROMPT"]}],
    "max_tokens": int(os.environ["TOKENS"]),
    "temperature": 0,
}
try:
    answer = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300).raise_for_status()
finally:
    done.set()
    sampler.join()
text = answer.json()["choices"][0]["message"]["content"]
print(f"pipeline: {text}")
single = open(os.path.join(os.environ["WORK"], "single.txt")).read().splitlines()[0]
assert text.strip() == single.strip(), f"pipeline {text!r} != single process {single!r}"

devices = httpx.get(f"{base}/api/devices").raise_for_status().json()["devices"]
for device in devices:
    if device.get("role") == "worker":
        print(
            f"{device['device_id']}: backend {device['backend']}, compute {device['compute']}, "
            f"layers [{device['layer_start']}, {device['layer_end']})"
        )
        assert device["backend"] == "cuda", device
peak = max(samples, default=(0, 0))
print(
    f"NVML: {len(samples)} samples, peak utilization {max(s[0] for s in samples)} %, "
    f"peak memory used {max(s[1] for s in samples) / 2**20:.0f} MiB"
)
assert samples and peak[1] > 0, "NVML returned no readings"
gpu = [d.get("metrics") or {} for d in devices if d.get("role") == "worker"]
print("dashboard GPU readings:", [m.get("gpu_utilization_ratio") for m in gpu])
EOF
echo "gpu_check: all checks passed"
