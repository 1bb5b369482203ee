//! The config's MQTT rules: ingest (MQTT topic filter → Weir topic and key), downlink
//! (Weir topic → MQTT topic), and bridges (a remote MQTT broker to subscribe to).
//!
//! An ingest filter is an MQTT filter whose levels may also be named captures:
//! `sensors/{device}/#` matches like `sensors/+/#` and binds `device`. A key template
//! uses `{name}` for captures, plus `{client_id}` and `{topic}`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use weir_wire::topics;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestRule {
    /// MQTT topic filter, with `{name}` levels that capture.
    pub filter: String,
    /// Weir topic the messages are appended to (created at start if missing).
    pub topic: String,
    /// Record key template; empty: no key (records spread over partitions).
    #[serde(default)]
    pub key: String,
    /// A plugin (component) the messages go through before they are stored: its
    /// outputs are appended to `topic`, its failures to `{topic}-dlq`.
    #[serde(default)]
    pub plugin: Option<std::path::PathBuf>,
    /// Params for the plugin's init.
    #[serde(default)]
    pub params: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownlinkRule {
    /// Weir topic whose records go out to MQTT (created at start if missing).
    pub topic: String,
    /// MQTT topic template: `{key}` (the record key as text), `{partition}`, `{topic}`.
    pub mqtt_topic: String,
    #[serde(default = "default_qos")]
    pub qos: u8,
    #[serde(default)]
    pub retain: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// host:port of the remote MQTT broker.
    pub address: String,
    /// Client id on the remote; the persistent session there is keyed by it.
    pub client_id: String,
    /// Filters subscribed to on the remote.
    pub filters: Vec<String>,
    #[serde(default = "default_qos")]
    pub qos: u8,
    #[serde(default = "default_bridge_keep_alive")]
    pub keep_alive_secs: u16,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// The MQTT version spoken to the remote: "5" (MQTT 5 properties cross the bridge)
    /// or "3.1.1" (for a remote that speaks nothing newer).
    #[serde(default = "default_bridge_version")]
    pub version: String,
}

fn default_bridge_version() -> String {
    "5".into()
}

fn default_qos() -> u8 {
    1
}

fn default_bridge_keep_alive() -> u16 {
    30
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("invalid MQTT filter {0:?}")]
    Filter(String),
    #[error("key template {template:?} uses {{{name}}}, which the filter does not capture")]
    UnknownCapture { template: String, name: String },
    #[error("unclosed brace in template {0:?}")]
    Template(String),
    #[error("QoS must be 0, 1 or 2, not {0}")]
    Qos(u8),
    #[error("invalid MQTT topic template {0:?}")]
    TopicTemplate(String),
    #[error("bridge version must be \"5\" or \"3.1.1\", not {0:?}")]
    BridgeVersion(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    Literal(String),
    Capture(String),
    Plus,
    Hash,
}

/// An ingest rule, parsed once.
#[derive(Clone, Debug)]
pub struct CompiledIngest {
    pub topic: String,
    levels: Vec<Level>,
    key: Template,
    /// Set at start when the rule names a plugin.
    pub plugin: Option<std::sync::Arc<crate::plugins::IngestPlugin>>,
}

impl CompiledIngest {
    pub fn compile(rule: &IngestRule) -> Result<Self, RuleError> {
        let levels: Vec<Level> = rule
            .filter
            .split('/')
            .map(|l| match l {
                "+" => Level::Plus,
                "#" => Level::Hash,
                l if l.len() > 2 && l.starts_with('{') && l.ends_with('}') => {
                    Level::Capture(l[1..l.len() - 1].to_string())
                }
                l => Level::Literal(l.to_string()),
            })
            .collect();
        let plain: Vec<&str> = levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Capture(_) | Level::Plus => "+",
                Level::Hash => "#",
            })
            .collect();
        if !topics::valid_filter(&plain.join("/")) {
            return Err(RuleError::Filter(rule.filter.clone()));
        }
        let key = Template::parse(&rule.key)?;
        for name in key.names() {
            let captured = levels
                .iter()
                .any(|l| l == &Level::Capture(name.to_string()));
            if !captured && name != "client_id" && name != "topic" {
                return Err(RuleError::UnknownCapture {
                    template: rule.key.clone(),
                    name: name.to_string(),
                });
            }
        }
        Ok(Self {
            topic: rule.topic.clone(),
            levels,
            key,
            plugin: None,
        })
    }

    /// The record key for a message on `topic` from `client_id`, if the rule
    /// matches (`Some(None)`: matches, no key).
    pub fn key_for(&self, topic: &str, client_id: &str) -> Option<Option<String>> {
        if topic.starts_with('$')
            && matches!(
                self.levels[0],
                Level::Plus | Level::Hash | Level::Capture(_)
            )
        {
            return None;
        }
        let mut captures = HashMap::new();
        let mut parts = topic.split('/');
        for level in &self.levels {
            match (level, parts.next()) {
                (Level::Hash, _) => {
                    parts = "".split('/');
                    parts.next();
                    break;
                }
                (Level::Plus, Some(_)) => {}
                (Level::Capture(name), Some(part)) => {
                    captures.insert(name.as_str(), part);
                }
                (Level::Literal(l), Some(part)) if l == part => {}
                _ => return None,
            }
        }
        if parts.next().is_some() {
            return None;
        }
        captures.insert("client_id", client_id);
        captures.insert("topic", topic);
        if self.key.is_empty() {
            return Some(None);
        }
        Some(Some(
            self.key
                .render(|name| captures.get(name).copied().unwrap_or("")),
        ))
    }
}

/// A text with `{name}` placeholders.
#[derive(Clone, Debug)]
pub struct Template(Vec<Piece>);

#[derive(Clone, Debug)]
enum Piece {
    Text(String),
    Name(String),
}

impl Template {
    pub fn parse(text: &str) -> Result<Self, RuleError> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| RuleError::Template(text.to_string()))?;
            pieces.push(Piece::Name(rest[open + 1..open + close].to_string()));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(Self(pieces))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|p| match p {
            Piece::Name(n) => Some(n.as_str()),
            Piece::Text(_) => None,
        })
    }

    pub fn render<'a>(&self, value: impl Fn(&str) -> &'a str) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Name(n) => out.push_str(value(n)),
            }
        }
        out
    }
}

/// Checks a downlink rule and returns its MQTT topic template.
pub fn compile_downlink(rule: &DownlinkRule) -> Result<Template, RuleError> {
    if rule.qos > 2 {
        return Err(RuleError::Qos(rule.qos));
    }
    let template = Template::parse(&rule.mqtt_topic)?;
    for name in template.names() {
        if !matches!(name, "key" | "partition" | "topic") {
            return Err(RuleError::UnknownCapture {
                template: rule.mqtt_topic.clone(),
                name: name.to_string(),
            });
        }
    }
    if !topics::valid_topic_name(&template.render(|_| "x")) {
        return Err(RuleError::TopicTemplate(rule.mqtt_topic.clone()));
    }
    Ok(template)
}

pub fn check_bridge(bridge: &BridgeConfig) -> Result<(), RuleError> {
    if bridge.qos > 2 {
        return Err(RuleError::Qos(bridge.qos));
    }
    if !matches!(bridge.version.as_str(), "5" | "3.1.1") {
        return Err(RuleError::BridgeVersion(bridge.version.clone()));
    }
    for f in &bridge.filters {
        if !topics::valid_filter(f) {
            return Err(RuleError::Filter(f.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(filter: &str, key: &str) -> CompiledIngest {
        CompiledIngest::compile(&IngestRule {
            filter: filter.into(),
            topic: "t".into(),
            key: key.into(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn captures_become_keys() {
        let r = rule("sensors/{device}/#", "{device}");
        assert_eq!(
            r.key_for("sensors/dev42/temp", "c"),
            Some(Some("dev42".into()))
        );
        assert_eq!(r.key_for("sensors/dev42", "c"), Some(Some("dev42".into())));
        assert_eq!(r.key_for("other/dev42/temp", "c"), None);
        assert_eq!(r.key_for("sensors", "c"), None);
        let r = rule("a/{x}/{y}", "{y}-{x}@{client_id}");
        assert_eq!(r.key_for("a/1/2", "cl"), Some(Some("2-1@cl".into())));
        assert_eq!(r.key_for("a/1/2/3", "cl"), None);
        let r = rule("#", "");
        assert_eq!(r.key_for("x/y", "c"), Some(None));
        assert_eq!(r.key_for("$SYS/y", "c"), None);
    }

    #[test]
    fn bad_rules_are_refused() {
        let bad = |filter: &str, key: &str| {
            CompiledIngest::compile(&IngestRule {
                filter: filter.into(),
                topic: "t".into(),
                key: key.into(),
                ..Default::default()
            })
            .unwrap_err()
        };
        assert!(matches!(bad("a/#/b", ""), RuleError::Filter(_)));
        assert!(matches!(
            bad("a/{x}", "{y}"),
            RuleError::UnknownCapture { .. }
        ));
        assert!(matches!(bad("a/{x}", "{x"), RuleError::Template(_)));
        let down = |t: &str| {
            compile_downlink(&DownlinkRule {
                topic: "c".into(),
                mqtt_topic: t.into(),
                qos: 1,
                retain: false,
            })
        };
        assert!(down("devices/{key}/commands").is_ok());
        assert!(down("devices/{nope}").is_err());
        assert!(down("devices/#").is_err());
    }
}
