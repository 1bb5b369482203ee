#!/usr/bin/env bash
# Builds upper.zig into a component with no wasm-tools: bindings from the WIT with
# wit-bindgen's C generator, the header through `zig translate-c` (Zig 0.17 has no
# @cImport), compiled for wasm32-wasi by PyPI's `ziglang`, made a component by
# `weir plugin componentize`, which links in the WASI adapter that Zig's panic handler
# needs. Usage: build.sh [OUT.wasm]. WEIR: the weir binary (default: the workspace's
# debug build).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../target/zig/zig_upper.wasm}"
weir="${WEIR:-$here/../../target/debug/weir}"
work="$here/../target/zig/zig-upper"
mkdir -p "$work/gen" "$(dirname "$out")"
wit-bindgen c "$here/../../wasm-sdk/wit" --world plugin --out-dir "$work/gen" >/dev/null 2>&1
python3 -m ziglang translate-c -target wasm32-wasi -lc "$work/gen/plugin.h" > "$work/plugin.zig"
cp "$here/upper.zig" "$work/upper.zig"
python3 -m ziglang build-exe "$work/upper.zig" "$work/gen/plugin.c" \
  "$work/gen/plugin_component_type.o" -I "$work/gen" \
  -target wasm32-wasi -O ReleaseSmall -fno-entry -rdynamic -lc -mexec-model=reactor \
  --stack 65536 -femit-bin="$work/core.wasm"
"$weir" plugin componentize "$work/core.wasm" -o "$out"
