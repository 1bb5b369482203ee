#!/usr/bin/env bash
# Builds scale.c into a component: bindings from the WIT with wit-bindgen's C
# generator, compiled for wasm32-wasi with zig cc (the `ziglang` package on PyPI),
# made a component with `weir plugin componentize` (no wasm-tools needed).
# Usage: build.sh [OUT.wasm]. With WASI=1, the variant that writes to stderr (so the
# module imports WASI preview1) and leaves the WIT out (componentize embeds it).
# WEIR: the weir binary (default: the workspace's debug build).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../target/c/c_scale.wasm}"
weir="${WEIR:-$here/../../target/debug/weir}"
work="$here/../target/c/c-scale${WASI:+-wasi}"
mkdir -p "$work" "$(dirname "$out")"
wit-bindgen c "$here/../../wasm-sdk/wit" --world plugin --out-dir "$work" >/dev/null 2>&1
if [ -n "${WASI:-}" ]; then
  # wit-bindgen's plugin.c links its type object in through this symbol.
  echo 'void __component_type_object_force_link_plugin(void) {}' > "$work/no_wit.c"
  extra=(-DSCALE_LOG_TO_STDERR "$work/no_wit.c")
else
  extra=("$work/plugin_component_type.o")
fi
python3 -m ziglang cc --target=wasm32-wasi -mexec-model=reactor -O2 -s -Wall -Werror \
  -Wl,-z,stack-size=65536 -Wl,--initial-memory=262144 \
  -I "$work" "$here/scale.c" "$work/plugin.c" "${extra[@]}" \
  -o "$work/core.wasm"
"$weir" plugin componentize "$work/core.wasm" -o "$out"
if command -v wasm-tools >/dev/null; then wasm-tools validate "$out"; fi
