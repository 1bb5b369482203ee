//! `weir plugin componentize`: a core WebAssembly module that exports the `plugin`
//! world by the canonical ABI (as wit-bindgen's C generator lays it out) becomes a
//! component Weir runs, with no wasm-tools: the WIT is embedded unless the module
//! carries it already (wit-bindgen's `*_component_type.o` puts it in), and a module
//! that imports `wasi_snapshot_preview1` (most toolchains' libc, Zig's panic handler)
//! gets the WASI preview1 adapter linked in, the reactor build that wasmtime 48 ships.

use anyhow::{Context, bail};
use wasmparser::{Parser, Payload};
use wit_component::{ComponentEncoder, StringEncoding};
use wit_parser::Resolve;

/// The contract, as `wasm-sdk/wit/plugin.wit` states it.
const WIT: &str = include_str!("../../../wasm-sdk/wit/plugin.wit");
/// The preview1 import module the adapter stands in for.
const PREVIEW1: &str = "wasi_snapshot_preview1";

/// What `componentize` found in the module and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Componentized {
    pub component: Vec<u8>,
    /// The module lacked the world's type information and got `plugin.wit`'s.
    pub embedded_wit: bool,
    /// The module imports WASI preview1, now served by the adapter.
    pub adapted_wasi: bool,
}

/// Wraps the core module `core` as a component of the `plugin` world.
pub fn componentize(core: &[u8]) -> anyhow::Result<Componentized> {
    if Parser::is_component(core) {
        bail!("this is a component already: `weir plugin test` runs it as it is");
    }
    if !Parser::is_core_wasm(core) {
        bail!("not a WebAssembly module (no \\0asm header)");
    }
    let mut has_wit = false;
    let mut imports_wasi = false;
    for payload in Parser::new(0).parse_all(core) {
        match payload.context("the module does not parse")? {
            Payload::CustomSection(s) if s.name().starts_with("component-type") => has_wit = true,
            Payload::ImportSection(imports) => {
                for import in imports.into_imports() {
                    imports_wasi |= import.context("bad import")?.module == PREVIEW1;
                }
            }
            _ => {}
        }
    }
    let mut module = core.to_vec();
    if !has_wit {
        let mut resolve = Resolve::default();
        let package = resolve
            .push_str("plugin.wit", WIT)
            .context("plugin.wit does not parse")?;
        let world = resolve.select_world(&[package], Some("plugin"))?;
        wit_component::embed_component_metadata(
            &mut module,
            &resolve,
            world,
            StringEncoding::UTF8,
        )?;
    }
    let mut encoder = ComponentEncoder::default()
        .validate(true)
        .module(&module)
        .context("the module does not export the plugin world by the canonical ABI")?;
    if imports_wasi {
        encoder = encoder.adapter(
            PREVIEW1,
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )?;
    }
    let component = encoder
        .encode()
        .context("the module does not make a component of the plugin world")?;
    Ok(Componentized {
        component,
        embedded_wit: !has_wit,
        adapted_wasi: imports_wasi,
    })
}
