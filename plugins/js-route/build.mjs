// Builds plugin.js into a component: node build.mjs [OUT.wasm]
// (calls componentize() directly; the `jco componentize` CLI fails here with
// "failed to get path metadata").
import { componentize } from "@bytecodealliance/componentize-js";
import { writeFile, mkdir } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(process.argv[2] ?? `${here}/../target/js/js_route.wasm`);
const { component } = await componentize({
  sourcePath: `${here}/plugin.js`,
  witPath: `${here}/../../wasm-sdk/wit`,
  worldName: "plugin",
  // No fetch or HTTP; stdio, clocks and random stay (the host grants WASI nothing).
  disableFeatures: ["http", "fetch-event"],
});
await mkdir(dirname(out), { recursive: true });
await writeFile(out, component);
console.log(`${out}: ${component.length} bytes`);
