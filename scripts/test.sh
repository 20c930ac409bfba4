#!/usr/bin/env bash
# The test command (README, CI): builds what only the tests need, then runs the suite.
# llama.cpp's Python bindings are the client GGUF exports are checked in: built from their PyPI
# sdist (~5-10 minutes on 2 cores the first time, then pip's wheel cache).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
if ! $PY -c "import llama_cpp" 2>/dev/null; then
  echo "[test] building llama.cpp's Python bindings (llama-cpp-python 0.3.36; 5-10 minutes the first time)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    $PY -m pip install -q --no-deps "llama-cpp-python==0.3.36" "diskcache>=5.6.1" "jinja2>=2.11.3" \
    || echo "warning: llama-cpp-python did not build; the GGUF checks in llama.cpp will be skipped" >&2
fi
[ $# -gt 0 ] || set -- tests  # arguments: pytest's own (files, -k ...); none: the whole suite
exec $PY -m pytest -q "$@"
