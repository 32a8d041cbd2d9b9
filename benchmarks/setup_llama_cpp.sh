#!/usr/bin/env bash
# Build llama.cpp's Python binding from its sdist with this machine's compiler (about 10 minutes on 2 cores;
# the wheel is cached), and keep the sdist's vendored convert_hf_to_gguf.py + gguf-py next to it, so
# benchmarks/decode_vs_hf.py can add llama.cpp as a baseline. Benchmarks only: nothing in lmstack needs it.
#
#   bash benchmarks/setup_llama_cpp.sh [python]      # default python: .venv/bin/python
#
# LLAMA_CPP_CMAKE_ARGS replaces the default "-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" (LMSTACK_LLAMA_CPP then names
# another cache); the wheel is built without pip's cache, so new arguments really rebuild.
set -euo pipefail
PY=${1:-.venv/bin/python}
VERSION=0.3.36
CACHE=${LMSTACK_LLAMA_CPP:-$HOME/.cache/lmstack/llama_cpp}
mkdir -p "$CACHE/wheels" "$CACHE/sdist"
if ! ls "$CACHE"/wheels/llama_cpp_python-$VERSION-*.whl >/dev/null 2>&1; then
  CMAKE_ARGS="${LLAMA_CPP_CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_CURL=OFF}" "$PY" -m pip wheel --no-cache-dir --no-deps "llama-cpp-python==$VERSION" \
    -w "$CACHE/wheels"
fi
"$PY" -m pip install -q "$CACHE"/wheels/llama_cpp_python-$VERSION-*.whl
if [ ! -f "$CACHE/src/convert_hf_to_gguf.py" ]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/sdist"
  mkdir -p "$CACHE/src"
  tar xzf "$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE/src" --strip-components=3 \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py" "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion"
fi
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'ready; converter in $CACHE/src')"
