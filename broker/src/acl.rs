//! Who may do what: the `[[auth.acl]]` rules, one model for MQTT and Kafka.
//!
//! A rule names principals (a user, a `*` pattern of users, `anonymous`, or `*` for
//! every client), allows or denies operations, and lists the topics (MQTT filters for
//! `publish` and `subscribe`; Kafka names or `prefix*` for the Kafka operations),
//! Kafka groups and transactional ids it is about; `{username}` and `{client_id}` in them stand for the
//! client's. With no rules everything is allowed; once there is one, what no rule
//! allows is denied, and a deny wins over any allow. As in Kafka, a client allowed to
//! read, write, delete or alter something may also describe it.
//!
//! Sans-I/O: the protocols ask, `auth::Gate` counts the answers.

use serde::{Deserialize, Serialize};

use weir_wire::topics;

/// Who a connection is, once admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    User(String),
    Anonymous,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// A user name, a pattern with `*`, `anonymous`, or `*` for every client.
    pub principal: String,
    pub action: Action,
    pub operations: Vec<Operation>,
    #[serde(default)]
    pub topics: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Kafka transactional ids: `write` to run transactions as one, `describe`.
    #[serde(default)]
    pub transactional_ids: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// MQTT PUBLISH (and a will).
    Publish,
    /// MQTT SUBSCRIBE.
    Subscribe,
    /// Kafka Fetch, and a group's members joining and committing.
    Read,
    /// Kafka Produce.
    Write,
    /// Kafka Metadata, offsets, configs, groups.
    Describe,
    /// Kafka CreateTopics, and Metadata creating a missing topic.
    Create,
    /// Kafka DeleteTopics.
    Delete,
    /// Changing a topic's settings (no Kafka API of Weir's does yet).
    Alter,
}

impl Operation {
    fn is_mqtt(self) -> bool {
        matches!(self, Operation::Publish | Operation::Subscribe)
    }

    /// Operations that let a client describe what they are allowed on (Kafka's rule).
    fn implies_describe(self) -> bool {
        matches!(
            self,
            Operation::Read | Operation::Write | Operation::Delete | Operation::Alter
        )
    }
}

/// What an operation acts on.
#[derive(Clone, Copy, Debug)]
pub enum Resource<'a> {
    /// A topic name: MQTT for `publish`, Kafka for the Kafka operations.
    Topic(&'a str),
    /// An MQTT subscription filter, without its `$share/{group}/` prefix.
    Filter(&'a str),
    /// A Kafka consumer group.
    Group(&'a str),
    /// A Kafka transactional id.
    TransactionalId(&'a str),
}

/// Who asks: the connection's principal and the client id it gave.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    pub principal: &'a Principal,
    pub client_id: &'a str,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("[[auth.acl]] rule {index} (principal {principal:?}): {problem}")]
pub struct AclError {
    pub index: usize,
    pub principal: String,
    pub problem: String,
}

/// The rules in force.
#[derive(Clone, Debug, Default)]
pub struct Acl {
    rules: Vec<AclRule>,
}

impl Acl {
    /// Checks the rules (numbered from 1 in errors, as they appear in the file).
    pub fn new(rules: Vec<AclRule>) -> Result<Self, AclError> {
        for (i, rule) in rules.iter().enumerate() {
            rule.check().map_err(|problem| AclError {
                index: i + 1,
                principal: rule.principal.clone(),
                problem,
            })?;
        }
        Ok(Self { rules })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `who` may do `op` on `resource`.
    pub fn allows(&self, who: Subject<'_>, op: Operation, resource: Resource<'_>) -> bool {
        if self.rules.is_empty() {
            return true;
        }
        let mut allowed = false;
        for rule in self.rules.iter().filter(|r| r.names(who.principal)) {
            match rule.action {
                Action::Deny
                    if rule.operations.contains(&op)
                        && rule
                            .patterns(resource)
                            .any(|p| touches(who, op, p, resource)) =>
                {
                    return false;
                }
                Action::Allow if !allowed && rule.grants(op) => {
                    allowed = rule
                        .patterns(resource)
                        .any(|p| covers(who, op, p, resource));
                }
                _ => {}
            }
        }
        allowed
    }
}

impl AclRule {
    fn check(&self) -> Result<(), String> {
        if self.principal.is_empty() {
            return Err("principal is empty".into());
        }
        if self.operations.is_empty() {
            return Err("operations is empty".into());
        }
        if self.topics.is_empty() && self.groups.is_empty() && self.transactional_ids.is_empty() {
            return Err("it names no topics, groups or transactional ids".into());
        }
        if self.operations.iter().any(|o| o.is_mqtt()) && self.topics.is_empty() {
            return Err("publish and subscribe need topics".into());
        }
        for pattern in self
            .topics
            .iter()
            .chain(&self.groups)
            .chain(&self.transactional_ids)
        {
            check_placeholders(pattern)?;
        }
        if self.operations.iter().any(|o| o.is_mqtt()) {
            for pattern in &self.topics {
                let filled = pattern
                    .replace("{username}", "u")
                    .replace("{client_id}", "c");
                if pattern != "*" && !topics::valid_filter(&filled) {
                    return Err(format!("{pattern:?} is not an MQTT topic filter"));
                }
            }
        }
        Ok(())
    }

    fn names(&self, principal: &Principal) -> bool {
        match (self.principal.as_str(), principal) {
            ("*", _) => true,
            ("anonymous", Principal::Anonymous) => true,
            (_, Principal::Anonymous) => false,
            (pattern, Principal::User(name)) => glob(pattern, name),
        }
    }

    fn grants(&self, op: Operation) -> bool {
        self.operations.contains(&op)
            || (op == Operation::Describe && self.operations.iter().any(|o| o.implies_describe()))
    }

    fn patterns(&self, resource: Resource<'_>) -> std::slice::Iter<'_, String> {
        match resource {
            Resource::Topic(_) | Resource::Filter(_) => self.topics.iter(),
            Resource::Group(_) => self.groups.iter(),
            Resource::TransactionalId(_) => self.transactional_ids.iter(),
        }
    }
}

fn check_placeholders(pattern: &str) -> Result<(), String> {
    let rest = pattern.replace("{username}", "").replace("{client_id}", "");
    if rest.contains(['{', '}']) {
        return Err(format!(
            "{pattern:?}: the placeholders are {{username}} and {{client_id}}"
        ));
    }
    Ok(())
}

/// `pattern` with the client's values in; `None` if a value is missing (an anonymous
/// client has no user name) or would change the pattern's shape.
fn substitute(pattern: &str, who: Subject<'_>) -> Option<String> {
    if !pattern.contains('{') {
        return Some(pattern.to_string());
    }
    let mut out = pattern.to_string();
    if out.contains("{username}") {
        let Principal::User(name) = who.principal else {
            return None;
        };
        out = out.replace("{username}", plain(name)?);
    }
    if out.contains("{client_id}") {
        out = out.replace("{client_id}", plain(who.client_id)?);
    }
    Some(out)
}

/// A value fit for a pattern: not empty, no level separator, no wildcard.
fn plain(value: &str) -> Option<&str> {
    (!value.is_empty() && !value.contains(['/', '+', '#', '*', '\0'])).then_some(value)
}

/// An allow rule's pattern: does it cover all of `resource`?
fn covers(who: Subject<'_>, op: Operation, pattern: &str, resource: Resource<'_>) -> bool {
    let Some(pattern) = substitute(pattern, who) else {
        return false;
    };
    if pattern == "*" {
        return true;
    }
    match resource {
        Resource::Topic(topic) if op.is_mqtt() => topics::matches(&pattern, topic),
        Resource::Filter(filter) => filter_covers(&pattern, filter),
        Resource::Topic(name) | Resource::Group(name) | Resource::TransactionalId(name) => {
            name_matches(&pattern, name)
        }
    }
}

/// A deny rule's pattern: does it touch any of `resource`?
fn touches(who: Subject<'_>, op: Operation, pattern: &str, resource: Resource<'_>) -> bool {
    match resource {
        Resource::Filter(filter) => {
            substitute(pattern, who).is_some_and(|p| p == "*" || filters_overlap(&p, filter))
        }
        _ => covers(who, op, pattern, resource),
    }
}

/// A Kafka name pattern: exact, or `prefix*`.
fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// `*` matches any run of characters; everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*` at all
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Whether every topic `filter` matches is matched by `pattern` (both valid filters).
fn filter_covers(pattern: &str, filter: &str) -> bool {
    if filter.starts_with('$') && pattern.starts_with(['+', '#']) {
        return false;
    }
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(a), Some(b)) if a == b && b != "+" && b != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some topic is matched by both filters.
fn filters_overlap(a: &str, b: &str) -> bool {
    let dollar = |x: &str, y: &str| x.starts_with('$') && y.starts_with(['+', '#']);
    if dollar(a, b) || dollar(b, a) {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(l), Some(m)) if l == m => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml_text: &str) -> Acl {
        #[derive(Deserialize)]
        struct File {
            acl: Vec<AclRule>,
        }
        let file: File = toml::from_str(toml_text).unwrap();
        Acl::new(file.acl).unwrap()
    }

    fn user(name: &str) -> Principal {
        Principal::User(name.into())
    }

    fn may(acl: &Acl, p: &Principal, client_id: &str, op: Operation, r: Resource<'_>) -> bool {
        let who = Subject {
            principal: p,
            client_id,
        };
        acl.allows(who, op, r)
    }

    #[test]
    fn no_rules_allow_everything() {
        let acl = Acl::default();
        assert!(may(
            &acl,
            &Principal::Anonymous,
            "c",
            Operation::Delete,
            Resource::Topic("t")
        ));
    }

    #[test]
    fn devices_publish_under_their_own_name_and_apps_read() {
        let acl = rules(
            r##"
            [[acl]]
            principal = "sensor-*"
            action = "allow"
            operations = ["publish"]
            topics = ["devices/{username}/#"]
            [[acl]]
            principal = "sensor-*"
            action = "allow"
            operations = ["subscribe"]
            topics = ["commands/{client_id}"]
            [[acl]]
            principal = "app"
            action = "allow"
            operations = ["read"]
            topics = ["readings*"]
            groups = ["app-*"]
            [[acl]]
            principal = "app"
            action = "allow"
            operations = ["write"]
            transactional_ids = ["etl-*"]
            [[acl]]
            principal = "*"
            action = "deny"
            operations = ["subscribe"]
            topics = ["devices/+/secret/#"]
            "##,
        );
        let s1 = user("sensor-1");
        let publish = |p: &Principal, t| may(&acl, p, "c1", Operation::Publish, Resource::Topic(t));
        assert!(publish(&s1, "devices/sensor-1/temp"));
        assert!(
            publish(&s1, "devices/sensor-1"),
            "# matches the parent level"
        );
        assert!(!publish(&s1, "devices/sensor-2/temp"));
        assert!(!publish(&user("app"), "devices/app/x"));
        assert!(!publish(&Principal::Anonymous, "devices/x/y"));

        let sub = |p: &Principal, f| may(&acl, p, "c1", Operation::Subscribe, Resource::Filter(f));
        assert!(sub(&s1, "commands/c1"));
        assert!(!sub(&s1, "commands/+"), "wider than allowed");
        assert!(!sub(&s1, "commands/c2"));

        let app = user("app");
        let kafka = |op, r| may(&acl, &app, "k", op, r);
        assert!(kafka(Operation::Read, Resource::Topic("readings")));
        assert!(kafka(Operation::Read, Resource::Topic("readings-eu")));
        assert!(
            kafka(Operation::Describe, Resource::Topic("readings")),
            "read implies describe"
        );
        assert!(!kafka(Operation::Write, Resource::Topic("readings")));
        assert!(!kafka(Operation::Read, Resource::Topic("other")));
        assert!(kafka(Operation::Read, Resource::Group("app-1")));
        assert!(!kafka(Operation::Read, Resource::Group("other")));
        let txn = |op, id| kafka(op, Resource::TransactionalId(id));
        assert!(txn(Operation::Write, "etl-1"));
        assert!(txn(Operation::Describe, "etl-1"), "write implies describe");
        assert!(!txn(Operation::Write, "other"));
        assert!(
            !kafka(Operation::Write, Resource::Topic("etl-1")),
            "ids are not topics"
        );
    }

    #[test]
    fn deny_wins_and_touches_overlapping_subscriptions() {
        let acl = rules(
            r##"
            [[acl]]
            principal = "*"
            action = "allow"
            operations = ["subscribe", "publish"]
            topics = ["#"]
            [[acl]]
            principal = "*"
            action = "deny"
            operations = ["subscribe"]
            topics = ["plant/+/secret/#"]
            "##,
        );
        let a = Principal::Anonymous;
        let sub = |f| may(&acl, &a, "c", Operation::Subscribe, Resource::Filter(f));
        assert!(sub("plant/1/temp"));
        assert!(!sub("plant/1/secret/key"));
        assert!(!sub("plant/#"), "could receive a denied topic");
        assert!(!sub("+/+/secret"), "the parent of secret/# is denied too");
        assert!(!sub("#"));
        assert!(sub("other/#"));
        assert!(!sub("$SYS/#"), "# does not cover $ topics");
        assert!(may(
            &acl,
            &a,
            "c",
            Operation::Publish,
            Resource::Topic("plant/1/secret/k")
        ));
    }

    #[test]
    fn substitution_needs_a_value_of_one_level() {
        let acl = rules(
            r##"
            [[acl]]
            principal = "*"
            action = "allow"
            operations = ["publish"]
            topics = ["u/{username}/#", "c/{client_id}"]
            "##,
        );
        let p = |who: &Principal, id, t| may(&acl, who, id, Operation::Publish, Resource::Topic(t));
        assert!(
            !p(&Principal::Anonymous, "x", "u/anonymous/a"),
            "anonymous has no user name"
        );
        assert!(p(&Principal::Anonymous, "x", "c/x"));
        assert!(!p(&Principal::Anonymous, "+", "c/+"));
        assert!(
            !p(&user("a/b"), "x", "u/a/b/c"),
            "a name holding / is not substituted"
        );
        assert!(p(&user("ab"), "x", "u/ab/c"));
    }

    #[test]
    fn bad_rules_are_refused_with_their_number() {
        let bad = [
            (
                r#"principal = "a"
                action = "allow"
                operations = []
                topics = ["t"]"#,
                "operations is empty",
            ),
            (
                r#"principal = "a"
                action = "allow"
                operations = ["publish"]
                groups = ["g"]"#,
                "publish and subscribe need topics",
            ),
            (
                r#"principal = "a"
                action = "allow"
                operations = ["subscribe"]
                topics = ["a/#/b"]"#,
                "not an MQTT topic filter",
            ),
            (
                r#"principal = "a"
                action = "allow"
                operations = ["read"]
                topics = ["{user}"]"#,
                "placeholders",
            ),
            (
                r#"principal = "a"
                action = "allow"
                operations = ["read"]"#,
                "no topics, groups or transactional ids",
            ),
        ];
        for (rule, problem) in bad {
            let text = format!(
                "[[acl]]\nprincipal = \"x\"\naction = \"allow\"\noperations = [\"read\"]\ntopics = [\"t\"]\n[[acl]]\n{rule}"
            );
            #[derive(Deserialize)]
            struct File {
                acl: Vec<AclRule>,
            }
            let file: File = toml::from_str(&text).unwrap();
            let e = Acl::new(file.acl).unwrap_err();
            assert_eq!(e.index, 2);
            assert!(e.to_string().contains(problem), "{e}");
        }
    }

    #[test]
    fn globs_and_filters() {
        assert!(glob("*", "anything"));
        assert!(glob("sensor-*", "sensor-1"));
        assert!(!glob("sensor-*", "sens"));
        assert!(glob("*-eu-*", "a-eu-b"));
        assert!(glob("a*a", "aa"));
        assert!(!glob("a*a", "a"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(filter_covers("a/+/c", "a/b/c"));
        assert!(filter_covers("a/+/c", "a/+/c"));
        assert!(!filter_covers("a/b/c", "a/+/c"));
        assert!(filter_covers("a/#", "a/+/#"));
        assert!(!filter_covers("a/+", "a/#"));
        assert!(filters_overlap("a/+/c", "a/b/#"));
        assert!(!filters_overlap("a/b", "a/c"));
        assert!(filters_overlap("#", "a"));
    }
}
