#!/usr/bin/env bash
# Creates benchmarks/crypten/.venv: a venv separate from the project's own, holding
# CrypTen 0.4.1 on the local CPU torch 2.13.0 wheel. Idempotent: safe to run again.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# torch: the CPU wheel that lies on this machine (never a CUDA build).
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
    "$PY" -m pip install torch==2.13.0
fi
# CrypTen without its pinned (old) dependencies, then what it really imports.
if ! "$PY" -m pip show crypten 2>/dev/null | grep -q '^Version: 0.4.1$'; then
    "$PY" -m pip install --no-deps crypten==0.4.1
fi
"$PY" -m pip install omegaconf pyyaml onnx numpy

# torch 2.13 removed torch.onnx._internal.registration; crypten imports it at module level
# in crypten/nn/onnx_converter.py, but only from_pytorch() needs it. Make it optional.
CONV="$("$PY" - <<'PYEOF'
import importlib.util, os
spec = importlib.util.find_spec("crypten")
print(os.path.join(os.path.dirname(spec.origin), "nn", "onnx_converter.py"))
PYEOF
)"
"$PY" - "$CONV" <<'PYEOF'
import re, sys
path = sys.argv[1]
src = open(path).read()
marker = "# secformer-benchmarks: optional registration import"
if marker in src:
    print(f"already patched: {path}")
    sys.exit(0)
pat = re.compile(r"^([ \t]*)(from torch\.onnx\._internal\.registration import [^\n]*|from torch\.onnx\._internal import registration[^\n]*|import torch\.onnx\._internal\.registration[^\n]*)$", re.M)
m = pat.search(src)
if not m:
    sys.exit(f"cannot find the registration import in {path}")
ind, line = m.group(1), m.group(2)
repl = (f"{ind}{marker}\n{ind}try:\n{ind}    {line}\n"
        f"{ind}except ImportError:  # removed in torch 2.13; only from_pytorch needs it\n"
        f"{ind}    registry = None")
src = src[:m.start()] + repl + src[m.end():]
open(path, "w").write(src)
print(f"patched: {path}")
PYEOF

# Smoke test: crypten imports and a CrypTensor round-trips.
"$PY" -c 'import crypten, torch; crypten.init(); x = crypten.cryptensor(torch.tensor([1.5, -2.25])); print("crypten", crypten.__version__ if hasattr(crypten, "__version__") else "0.4.1", "ok:", x.get_plain_text().tolist())'
