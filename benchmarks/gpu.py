"""The GPU check, one command: ``python -m benchmarks --gpu`` (meant to finish in under 8 minutes on one H100/H200).

1. The CUDA tests (tests/test_cuda.py): exact mode against the float64 reference on CUDA,
   16-mixed with a real GradScaler, bf16-mixed, no host sync in a step between refreshes, and the callback
   under single-GPU FSDP2 (ModelParallelStrategy, fully_shard) against the plain engine.
2. The step ratio against SGD for a GPT of width 512, 8 layers, 256-token sequences and a
   CIFAR ResNet-18 on synthetic 32×32 batches of 256 (benchmarks/step_overhead.py).
3. Layer scaling at d = 4096 and 8192, k = 32 (benchmarks/layer_scaling.py).

Each part runs in its own process with a time limit; everything lands in
benchmarks/results/gpu/ (the parts' JSON and PNG, the tests' JUnit XML, summary.json).
Needs no network: the device needs only torch, Lightning, torchmetrics, torchvision and sklearn.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lightning_lrkfac.options import KFACOptions

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RANK = KFACOptions().rank  # the step ratio at the defaults (the CPU run adds rank 32)
OUT = ROOT / "benchmarks" / "results" / "gpu"

PARTS = {
    "cuda_tests": [
        sys.executable, "-m", "pytest", "-q", "-s", "tests/test_cuda.py", f"--junitxml={OUT / 'cuda_tests.xml'}",
    ],
    "step_overhead": [
        sys.executable, "-m", "benchmarks.step_overhead", "--device", "cuda",
        "--only", "gpt-w512-d8-s256", "resnet18-synthetic32", "mlp-w1024-b256", "--ranks", str(DEFAULT_RANK),
    ],
    "layer_scaling": [
        sys.executable, "-m", "benchmarks.layer_scaling", "--device", "cuda", "--dims", "4096", "8192", "--ranks", "32",
    ],
}  # fmt: skip
LIMITS = {"cuda_tests": 150, "step_overhead": 200, "layer_scaling": 100}


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks --gpu: no CUDA device here (torch.cuda.is_available() is False)")
    OUT.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "LRKFAC_RESULTS_DIR": str(OUT)}
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "parts": {}}
    for name, command in PARTS.items():
        started = time.perf_counter()
        try:
            done = subprocess.run(
                command, cwd=ROOT, env=environment, timeout=LIMITS[name], capture_output=True, text=True
            )
            returncode, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as expired:
            returncode, output = "timeout", f"{expired.stdout or ''}{expired.stderr or ''}"
        seconds = time.perf_counter() - started
        (OUT / f"{name}.log").write_text(output if isinstance(output, str) else output.decode())
        summary["parts"][name] = {"returncode": returncode, "seconds": round(seconds, 1)}
        print(f"--- {name}: return code {returncode}, {seconds:.0f} s", flush=True)
        print("\n".join(str(output).splitlines()[-25:]), flush=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
    failed = [name for name, part in summary["parts"].items() if part["returncode"] != 0]
    if failed:
        raise SystemExit(f"benchmarks --gpu: failed parts {failed}; logs in {OUT}")


if __name__ == "__main__":
    main()
