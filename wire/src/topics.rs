//! MQTT topic names and filters: validation, matching (`+`, `#`, and the rule that
//! leading wildcards do not match `$` topics), shared subscriptions
//! (`$share/{group}/{filter}`), and the subscription index the router matches against.
//!
//! Sans-I/O: plain data in, plain data out.

use std::collections::HashMap;

/// A topic name a client may publish to: non-empty, no wildcards, no NUL.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= 65_535 && !topic.contains(['+', '#', '\0'])
}

/// A topic filter: `+` fills a whole level, `#` only as the whole last level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Does `filter` match `topic`? Both must be valid. Topics starting with `$` are not
/// matched by a filter starting with a wildcard [MQTT-4.7.2-1].
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A subscription filter as a client sent it, split into its share group (for
/// `$share/{group}/{filter}`) and the filter proper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionFilter {
    pub share_group: Option<String>,
    pub filter: String,
}

impl SubscriptionFilter {
    /// `None` if the filter (or the share group name) is invalid.
    pub fn parse(raw: &str) -> Option<Self> {
        if let Some(rest) = raw.strip_prefix("$share/") {
            let (group, filter) = rest.split_once('/')?;
            if group.is_empty() || group.contains(['+', '#']) || !valid_filter(filter) {
                return None;
            }
            return Some(Self {
                share_group: Some(group.to_string()),
                filter: filter.to_string(),
            });
        }
        valid_filter(raw).then(|| Self {
            share_group: None,
            filter: raw.to_string(),
        })
    }
}

/// An index from filters to the subscribers (values of type `S`, keyed by client id)
/// holding them, organised as a tree of topic levels so matching a topic visits only
/// the branches that can match it, whatever the number of clients.
#[derive(Debug)]
pub struct SubscriptionTree<S> {
    root: Node<S>,
    len: usize,
}

#[derive(Debug)]
struct Node<S> {
    /// The filter this node stands for.
    filter: String,
    children: HashMap<String, Node<S>>,
    /// (share group or "" for a plain subscription, client id) → subscriber
    subscribers: HashMap<(String, String), S>,
}

impl<S> Default for Node<S> {
    fn default() -> Self {
        Self {
            filter: String::new(),
            children: HashMap::new(),
            subscribers: HashMap::new(),
        }
    }
}

impl<S> Default for SubscriptionTree<S> {
    fn default() -> Self {
        Self {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<S> SubscriptionTree<S> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces; returns whether the subscription already existed.
    pub fn insert(&mut self, filter: &SubscriptionFilter, client: &str, sub: S) -> bool {
        let mut node = &mut self.root;
        for (depth, level) in filter.filter.split('/').enumerate() {
            let path = if depth == 0 {
                level.to_string()
            } else {
                format!("{}/{level}", node.filter)
            };
            node = node
                .children
                .entry(level.to_string())
                .or_insert_with(|| Node {
                    filter: path,
                    ..Node::default()
                });
        }
        let key = (
            filter.share_group.clone().unwrap_or_default(),
            client.to_string(),
        );
        let existed = node.subscribers.insert(key, sub).is_some();
        if !existed {
            self.len += 1;
        }
        existed
    }

    /// Removes; returns whether it existed. Empty branches are pruned.
    pub fn remove(&mut self, filter: &SubscriptionFilter, client: &str) -> bool {
        let levels: Vec<&str> = filter.filter.split('/').collect();
        let key = (
            filter.share_group.clone().unwrap_or_default(),
            client.to_string(),
        );
        let removed = remove_at(&mut self.root, &levels, &key);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Calls `f(share_group, filter, client, subscriber)` for every subscription
    /// matching `topic`; `share_group` is empty for a plain subscription.
    pub fn for_each_match<'a>(
        &'a self,
        topic: &str,
        mut f: impl FnMut(&'a str, &'a str, &'a str, &'a S),
    ) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        visit(&self.root, &levels, 0, dollar, &mut f);
    }
}

fn remove_at<S>(node: &mut Node<S>, levels: &[&str], key: &(String, String)) -> bool {
    match levels.split_first() {
        None => node.subscribers.remove(key).is_some(),
        Some((level, rest)) => {
            let Some(child) = node.children.get_mut(*level) else {
                return false;
            };
            let removed = remove_at(child, rest, key);
            if child.children.is_empty() && child.subscribers.is_empty() {
                node.children.remove(*level);
            }
            removed
        }
    }
}

fn visit<'a, S>(
    node: &'a Node<S>,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    f: &mut impl FnMut(&'a str, &'a str, &'a str, &'a S),
) {
    let wildcards_allowed = !(depth == 0 && dollar);
    if wildcards_allowed && let Some(hash) = node.children.get("#") {
        emit(hash, f);
    }
    let Some((level, rest)) = levels.split_first() else {
        emit(node, f);
        return;
    };
    if let Some(child) = node.children.get(*level) {
        visit(child, rest, depth + 1, dollar, f);
    }
    if wildcards_allowed && let Some(plus) = node.children.get("+") {
        visit(plus, rest, depth + 1, dollar, f);
    }
}

fn emit<'a, S>(node: &'a Node<S>, f: &mut impl FnMut(&'a str, &'a str, &'a str, &'a S)) {
    for ((group, client), sub) in &node.subscribers {
        f(group, &node.filter, client, sub);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_and_names() {
        for ok in ["#", "+", "a/+/c", "a/#", "/", "a//b", "+/+", "$SYS/#"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a+/b", "a/b#", "a\0"] {
            assert!(!valid_filter(bad), "{bad}");
        }
        assert!(valid_topic_name("a/b"));
        assert!(!valid_topic_name("a/+"));
        assert!(!valid_topic_name("a/#"));
        assert!(!valid_topic_name(""));
    }

    #[test]
    fn matching() {
        let cases = [
            ("a/b/c", "a/b/c", true),
            ("a/+/c", "a/b/c", true),
            ("a/+", "a/b/c", false),
            ("a/#", "a/b/c", true),
            ("a/#", "a", true),
            ("#", "a/b", true),
            ("+", "a", true),
            ("+", "", true),
            ("+/+", "/a", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
        ];
        for (filter, topic, want) in cases {
            assert_eq!(matches(filter, topic), want, "{filter} ~ {topic}");
            let mut tree = SubscriptionTree::default();
            tree.insert(&SubscriptionFilter::parse(filter).unwrap(), "c", ());
            let mut hit = false;
            tree.for_each_match(topic, |_, _, _, _| hit = true);
            assert_eq!(hit, want, "tree: {filter} ~ {topic}");
        }
    }

    #[test]
    fn shared_filters() {
        let s = SubscriptionFilter::parse("$share/g1/a/+").unwrap();
        assert_eq!(s.share_group.as_deref(), Some("g1"));
        assert_eq!(s.filter, "a/+");
        assert!(SubscriptionFilter::parse("$share/g1").is_none());
        assert!(SubscriptionFilter::parse("$share//a").is_none());
        assert!(SubscriptionFilter::parse("$share/g+/a").is_none());
    }

    #[test]
    fn tree_insert_remove() {
        let mut tree = SubscriptionTree::default();
        let f = SubscriptionFilter::parse("a/+/c").unwrap();
        assert!(!tree.insert(&f, "x", 1));
        assert!(tree.insert(&f, "x", 2));
        assert_eq!(tree.len(), 1);
        assert!(tree.remove(&f, "x"));
        assert!(!tree.remove(&f, "x"));
        assert!(tree.root.children.is_empty());
        tree.insert(&SubscriptionFilter::parse("$share/g/a/#").unwrap(), "y", 3);
        let mut seen = Vec::new();
        tree.for_each_match("a/b", |g, f, c, s| seen.push((g, f, c, *s)));
        assert_eq!(seen, vec![("g", "a/#", "y", 3)]);
    }
}
