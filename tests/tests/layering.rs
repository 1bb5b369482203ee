//! The code's dependencies go one way, and this keeps them so.
//!
//! - `weir-wire`, the codecs of untrusted bytes, depends on no runtime: no tokio, redb,
//!   wasmtime or librdkafka (read from `cargo metadata`, so a new dependency that pulls
//!   one in fails here, not in a review). One known exception: `rumqttc`, whose
//!   `mqttbytes` packet codecs the crate uses, is an MQTT client and depends on tokio
//!   itself; what it brings is not followed, and nothing else may bring a runtime.
//! - The broker's top-level modules are in layers (ARCHITECTURE.md, "Layers"): a module
//!   names only modules of lower layers, so there is no cycle and no two modules of one
//!   layer lean on each other. A new module must be given a layer here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The broker's top-level modules, lowest layer first.
const LAYERS: &[&[&str]] = &[
    &["backoff", "metrics"],
    &["acl", "names", "tls"],
    &["storage"],
    &["auth", "bench", "plugins", "replication"],
    &["kafka", "mqtt"],
    &["shell", "status"],
    &["admin", "config"],
    &["server"],
];

/// Crates that do I/O or run tasks: none may be under `weir-wire`.
/// (`rumqttc`'s own dependencies are not followed: see the module doc.)
const RUNTIMES: &[&str] = &[
    "tokio",
    "mio",
    "redb",
    "wasmtime",
    "rdkafka",
    "rdkafka-sys",
    "openssl-sys",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

fn host_triple() -> String {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_string()
}

#[test]
fn the_wire_crate_depends_on_no_runtime() {
    // Only this machine's platform: the lock file also lists Windows-only crates that a
    // fresh machine never downloads, and metadata for every platform would want them.
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(["--filter-platform", &host_triple()])
        .current_dir(repo())
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let names: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let nodes: BTreeMap<&str, &serde_json::Value> = meta["resolve"]["nodes"]
        .as_array()
        .expect("resolve nodes")
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let wire = names
        .iter()
        .find(|(_, name)| **name == "weir-wire")
        .map(|(id, _)| *id)
        .expect("weir-wire is a workspace member");

    // Everything weir-wire builds with (normal dependencies, transitively).
    let mut seen = BTreeSet::from([wire]);
    let mut queue = vec![wire];
    while let Some(id) = queue.pop() {
        for dep in nodes[id]["deps"].as_array().expect("deps") {
            let normal = dep["dep_kinds"]
                .as_array()
                .expect("dep_kinds")
                .iter()
                .any(|k| k["kind"].is_null());
            let dep_id = dep["pkg"].as_str().unwrap();
            if normal && seen.insert(dep_id) && names[dep_id] != "rumqttc" {
                queue.push(dep_id);
            }
        }
    }
    let under: BTreeSet<&str> = seen.iter().map(|id| names[id]).collect();
    assert!(under.contains("kafka-protocol") && under.contains("rumqttc"));
    let runtimes: Vec<&&str> = RUNTIMES.iter().filter(|r| under.contains(**r)).collect();
    assert!(
        runtimes.is_empty(),
        "weir-wire must not depend on {runtimes:?}; it builds with {under:?}"
    );
}

/// The top-level modules a source file names: `crate::x`, or `super::x` from the
/// depth of the file (`super::super::x` in `src/dir/file.rs`).
fn named_modules(source: &str, depth: usize) -> BTreeSet<String> {
    let mut prefixes = vec!["crate::".to_string()];
    if depth > 0 {
        prefixes.push("super::".repeat(depth));
    }
    let mut found = BTreeSet::new();
    for prefix in &prefixes {
        for (at, _) in source.match_indices(prefix.as_str()) {
            let before = source[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let rest = &source[at + prefix.len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != "super" {
                found.insert(name);
            }
        }
    }
    found
}

/// Every `.rs` file under the module directory `dir` (itself `depth` below the crate
/// root), with how many `super::` lead from each to the crate root.
fn sources(dir: &Path, depth: usize, out: &mut Vec<(PathBuf, usize)>) {
    for entry in std::fs::read_dir(dir).expect("read source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, depth + 1, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let is_mod = path.file_name().is_some_and(|n| n == "mod.rs");
            out.push((path, if is_mod { depth } else { depth + 1 }));
        }
    }
}

#[test]
fn broker_modules_name_only_lower_layers() {
    let src = repo().join("broker/src");
    let layer_of: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(layer, modules)| modules.iter().map(move |m| (*m, layer)))
        .collect();

    let mut problems = Vec::new();
    for entry in std::fs::read_dir(&src).expect("broker/src") {
        let path = entry.expect("dir entry").path();
        let Some(module) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if matches!(module, "lib" | "main") {
            continue;
        }
        let Some(&layer) = layer_of.get(module) else {
            problems.push(format!(
                "module `{module}` has no layer in tests/tests/layering.rs"
            ));
            continue;
        };
        let mut files = Vec::new();
        if path.is_dir() {
            sources(&path, 1, &mut files);
        } else {
            files.push((path.clone(), 1));
        }
        for (file, depth) in files {
            let text = std::fs::read_to_string(&file).expect("read source");
            for named in named_modules(&text, depth) {
                match layer_of.get(named.as_str()) {
                    Some(&other) if named != module && other >= layer => problems.push(format!(
                        "{} (`{module}`, layer {layer}) names `{named}` (layer {other})",
                        file.strip_prefix(&src).unwrap_or(&file).display()
                    )),
                    _ => {}
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn named_modules_reads_paths_at_the_files_depth() {
    let text = "use crate::storage::Log;\nuse super::super::acl::Acl;\nuse super::Foo;\n\
                let x = weir_crate::mqtt::X; // not ours\n";
    assert_eq!(
        named_modules(text, 2),
        BTreeSet::from(["storage".to_string(), "acl".to_string()])
    );
    assert_eq!(
        named_modules(text, 1),
        BTreeSet::from(["storage".to_string(), "Foo".to_string()])
    );
}
