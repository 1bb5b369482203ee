//! The names operators give what they deploy and configure: plugins, pipelines and
//! replication rules. They appear in URLs of the admin API, file names and state keys,
//! so one rule serves them all.

/// 1 to 100 ASCII letters, digits, `.`, `_` or `-`, and not ending in `.wasm` (a
/// plugin's name is not its file).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.ends_with(".wasm")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}
