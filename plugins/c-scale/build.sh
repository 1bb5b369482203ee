#!/usr/bin/env bash
# Builds scale.c into a component: bindings from the WIT with wit-bindgen's C
# generator, compiled for wasm32-wasi with zig cc (the `ziglang` package on PyPI),
# made a component with wasm-tools. Usage: build.sh [OUT.wasm]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../target/c/c_scale.wasm}"
work="$here/../target/c/c-scale"
mkdir -p "$work" "$(dirname "$out")"
wit-bindgen c "$here/../../wasm-sdk/wit" --world plugin --out-dir "$work" >/dev/null 2>&1
python3 -m ziglang cc --target=wasm32-wasi -mexec-model=reactor -O2 -s -Wall -Werror \
  -Wl,-z,stack-size=65536 -Wl,--initial-memory=262144 \
  -I "$work" "$here/scale.c" "$work/plugin.c" "$work/plugin_component_type.o" \
  -o "$work/core.wasm"
wasm-tools component new "$work/core.wasm" -o "$out"
wasm-tools validate "$out"
echo "$out: $(stat -c %s "$out") bytes"
