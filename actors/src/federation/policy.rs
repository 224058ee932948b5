//! Route policies: which announcements a cluster imports from each neighbour and which it
//! exports.
//!
//! A [`RoutePolicy`] constrains the destination, the advertiser, the tags and the hop
//! count of a route. An absent set means "no constraint"; a present but **empty** set
//! denies everything (as in the reference: `allowed_destinations = []` imports nothing).
//! Tags pass when the route carries at least one allowed tag (so an untagged route fails
//! an `allowed_tags` constraint) and none of the denied tags.
//!
//! [`ImportPolicies`] picks the policy of the neighbour cluster that delivered an
//! announcement, else the default; [`ExportPolicies`] applies a global policy to every
//! announcement this cluster emits, then the receiving neighbour's own, if any.
//! Withdrawals are never filtered by policy: forgetting a route is always allowed.
//!
//! Routes say which clusters can be reached; [`Exports`] says what of this cluster they
//! may use once there: functions, topics and queues by name or pattern, nothing unless
//! listed.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::ClusterId;
use crate::pubsub::topic::TopicPattern;

/// Constraints on a route. Settings shape (TOML):
/// `{ allowed_destinations = ["c"], allowed_advertisers = ["b"], allowed_tags = ["gold"],
/// deny_tags = ["test"], max_hops = 3 }`, every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutePolicy {
    /// Destinations allowed (absent = all; empty = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_destinations: Option<BTreeSet<ClusterId>>,
    /// Advertisers allowed (absent = all; empty = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_advertisers: Option<BTreeSet<ClusterId>>,
    /// At least one of these tags is required (absent = no requirement; empty = none pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_tags: Option<BTreeSet<String>>,
    /// Routes with any of these tags are refused.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub deny_tags: BTreeSet<String>,
    /// Most links from this cluster to the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_hops: Option<u32>,
}

/// Why a policy refused a route (for explanations and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyDenial {
    /// Destination not allowed.
    Destination,
    /// Advertiser not allowed.
    Advertiser,
    /// No allowed tag, or a denied one.
    Tags,
    /// More hops than `max_hops`.
    Hops,
}

impl RoutePolicy {
    /// Checks a route to `destination` from `advertiser` with `tags`, `hops` links away.
    pub fn check(
        &self,
        destination: &str,
        advertiser: &str,
        tags: &BTreeSet<String>,
        hops: u32,
    ) -> Result<(), PolicyDenial> {
        if self.allowed_destinations.as_ref().is_some_and(|allowed| !allowed.contains(destination)) {
            return Err(PolicyDenial::Destination);
        }
        if self.allowed_advertisers.as_ref().is_some_and(|allowed| !allowed.contains(advertiser)) {
            return Err(PolicyDenial::Advertiser);
        }
        if self.allowed_tags.as_ref().is_some_and(|allowed| allowed.is_disjoint(tags))
            || !self.deny_tags.is_disjoint(tags)
        {
            return Err(PolicyDenial::Tags);
        }
        if self.max_hops.is_some_and(|max| hops > max) {
            return Err(PolicyDenial::Hops);
        }
        Ok(())
    }
}

/// Import policy per neighbour cluster, with a default for the others.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportPolicies {
    /// For neighbours without their own entry.
    #[serde(default)]
    pub default: RoutePolicy,
    /// By neighbour cluster id.
    #[serde(default)]
    pub neighbors: BTreeMap<ClusterId, RoutePolicy>,
}

impl ImportPolicies {
    /// The policy for announcements delivered by `neighbor`.
    pub fn for_neighbor(&self, neighbor: &str) -> &RoutePolicy {
        self.neighbors.get(neighbor).unwrap_or(&self.default)
    }
}

/// What this cluster announces: a global policy and per-neighbour ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportPolicies {
    /// Every announcement must pass it.
    #[serde(default)]
    pub global: RoutePolicy,
    /// Announcements to a neighbour must also pass its entry.
    #[serde(default)]
    pub neighbors: BTreeMap<ClusterId, RoutePolicy>,
}

impl ExportPolicies {
    /// May a route be announced to `neighbor`?
    pub fn allows(
        &self,
        neighbor: &str,
        destination: &str,
        advertiser: &str,
        tags: &BTreeSet<String>,
        hops: u32,
    ) -> bool {
        self.global.check(destination, advertiser, tags, hops).is_ok()
            && self.neighbors.get(neighbor).is_none_or(|p| p.check(destination, advertiser, tags, hops).is_ok())
    }
}

/// Most patterns in each list of an [`ExportList`].
pub const MAX_EXPORT_PATTERNS: usize = 256;
/// Longest export pattern, in bytes.
pub const MAX_EXPORT_PATTERN_BYTES: usize = 256;

/// What this cluster lets other clusters use, as configured (settings shape:
/// `{ functions = ["echo", "models.*"], topics = ["metrics.#"], queues = ["jobs"], cache = ["shared.#"] }`).
/// Each entry is an exact name or a pattern matched as pub/sub topics are: names split on
/// `.`, `*` is one word, `#` zero or more. A list that is absent or empty shares nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportList {
    /// Functions other clusters may call.
    #[serde(default)]
    pub functions: Vec<String>,
    /// Topics whose publishes cross to other clusters.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Queues other clusters may send to (and read the stats of).
    #[serde(default)]
    pub queues: Vec<String>,
    /// Cache namespaces other clusters may read (their L4).
    #[serde(default)]
    pub cache: Vec<String>,
}

/// An [`ExportList`] compiled for matching (each match costs at most pattern words ×
/// name words, see [`TopicPattern`]).
#[derive(Debug, Clone, Default)]
pub struct Exports {
    functions: Vec<TopicPattern>,
    topics: Vec<TopicPattern>,
    queues: Vec<TopicPattern>,
    cache: Vec<TopicPattern>,
}

impl Exports {
    /// Compiles `list`; a list over [`MAX_EXPORT_PATTERNS`] or a pattern empty or over
    /// [`MAX_EXPORT_PATTERN_BYTES`] is an error naming the field.
    pub fn new(list: &ExportList) -> Result<Self, String> {
        let compile = |field: &str, patterns: &[String]| -> Result<Vec<TopicPattern>, String> {
            if patterns.len() > MAX_EXPORT_PATTERNS {
                return Err(format!("exports.{field}: more than {MAX_EXPORT_PATTERNS} patterns"));
            }
            patterns
                .iter()
                .map(|p| {
                    if p.is_empty() || p.len() > MAX_EXPORT_PATTERN_BYTES {
                        Err(format!("exports.{field}: a pattern must be 1..={MAX_EXPORT_PATTERN_BYTES} bytes"))
                    } else {
                        Ok(TopicPattern::new(p))
                    }
                })
                .collect()
        };
        Ok(Exports {
            functions: compile("functions", &list.functions)?,
            topics: compile("topics", &list.topics)?,
            queues: compile("queues", &list.queues)?,
            cache: compile("cache", &list.cache)?,
        })
    }

    /// May other clusters call the function `name`?
    pub fn shares_function(&self, name: &str) -> bool {
        self.functions.iter().any(|p| p.matches(name))
    }

    /// Do publishes on `topic` cross to other clusters?
    pub fn shares_topic(&self, topic: &str) -> bool {
        self.topics.iter().any(|p| p.matches(topic))
    }

    /// May other clusters send to the queue `name`?
    pub fn shares_queue(&self, name: &str) -> bool {
        self.queues.iter().any(|p| p.matches(name))
    }

    /// May other clusters read the cache namespace `namespace`?
    pub fn shares_cache(&self, namespace: &str) -> bool {
        self.cache.iter().any(|p| p.matches(namespace))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn absent_allows_all_and_empty_denies_all() {
        let open = RoutePolicy::default();
        assert_eq!(open.check("c", "b", &set(&[]), 9), Ok(()));
        let closed = RoutePolicy { allowed_destinations: Some(BTreeSet::new()), ..RoutePolicy::default() };
        assert_eq!(closed.check("c", "b", &set(&["gold"]), 1), Err(PolicyDenial::Destination));
        let no_adv = RoutePolicy { allowed_advertisers: Some(BTreeSet::new()), ..RoutePolicy::default() };
        assert_eq!(no_adv.check("c", "b", &set(&[]), 1), Err(PolicyDenial::Advertiser));
        let no_tags = RoutePolicy { allowed_tags: Some(BTreeSet::new()), ..RoutePolicy::default() };
        assert_eq!(no_tags.check("c", "b", &set(&["gold"]), 1), Err(PolicyDenial::Tags));
    }

    #[test]
    fn tags_allow_and_deny() {
        let policy =
            RoutePolicy { allowed_tags: Some(set(&["gold"])), deny_tags: set(&["test"]), ..RoutePolicy::default() };
        assert_eq!(policy.check("c", "b", &set(&["gold"]), 1), Ok(()));
        assert_eq!(policy.check("c", "b", &set(&["silver"]), 1), Err(PolicyDenial::Tags));
        assert_eq!(policy.check("c", "b", &set(&[]), 1), Err(PolicyDenial::Tags), "untagged fails an allow list");
        assert_eq!(policy.check("c", "b", &set(&["gold", "test"]), 1), Err(PolicyDenial::Tags));
        let max = RoutePolicy { max_hops: Some(2), ..RoutePolicy::default() };
        assert_eq!(max.check("c", "b", &set(&[]), 2), Ok(()));
        assert_eq!(max.check("c", "b", &set(&[]), 3), Err(PolicyDenial::Hops));
    }

    #[test]
    fn neighbor_policies_fall_back_to_the_default() {
        let import: ImportPolicies = toml_like(
            r#"{"default": {"allowed_destinations": []}, "neighbors": {"b": {"allowed_destinations": ["c"]}}}"#,
        );
        assert_eq!(import.for_neighbor("b").check("c", "b", &set(&[]), 1), Ok(()));
        assert!(import.for_neighbor("x").check("c", "x", &set(&[]), 1).is_err());
        let export: ExportPolicies = toml_like(r#"{"neighbors": {"a": {"allowed_destinations": ["b"]}}}"#);
        assert!(export.allows("a", "b", "me", &set(&[]), 1));
        assert!(!export.allows("a", "d", "me", &set(&[]), 1), "cluster D is hidden from A");
        assert!(export.allows("z", "d", "me", &set(&[]), 1));
        assert!(serde_json::from_str::<RoutePolicy>(r#"{"allowed_destinaton": []}"#).is_err(), "typos are errors");
    }

    fn toml_like<T: for<'de> Deserialize<'de>>(json: &str) -> T {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn exports_share_by_name_or_pattern_and_nothing_by_default() {
        let nothing = Exports::new(&ExportList::default()).unwrap();
        assert!(!nothing.shares_function("echo") && !nothing.shares_topic("a") && !nothing.shares_queue("q"));
        assert!(!nothing.shares_cache("users"));
        let list: ExportList =
            serde_json::from_str(r#"{"functions": ["echo", "models.*"], "topics": ["metrics.#"], "queues": ["jobs"], "cache": ["shared.#"]}"#)
                .unwrap();
        let shared = Exports::new(&list).unwrap();
        assert!(shared.shares_function("echo") && shared.shares_function("models.score"));
        assert!(!shared.shares_function("models.score.v2") && !shared.shares_function("add"));
        assert!(shared.shares_topic("metrics") && shared.shares_topic("metrics.cpu.load"));
        assert!(!shared.shares_topic("logs.cpu"));
        assert!(shared.shares_queue("jobs") && !shared.shares_queue("jobs.dlq"));
        assert!(shared.shares_cache("shared") && shared.shares_cache("shared.users") && !shared.shares_cache("users"));
    }

    #[test]
    fn export_lists_are_bounded() {
        let too_many = ExportList { functions: vec!["f".into(); MAX_EXPORT_PATTERNS + 1], ..ExportList::default() };
        assert!(Exports::new(&too_many).unwrap_err().contains("exports.functions"));
        let too_long = ExportList { topics: vec!["t".repeat(MAX_EXPORT_PATTERN_BYTES + 1)], ..ExportList::default() };
        assert!(Exports::new(&too_long).unwrap_err().contains("exports.topics"));
        let empty = ExportList { queues: vec![String::new()], ..ExportList::default() };
        assert!(Exports::new(&empty).unwrap_err().contains("exports.queues"));
        // A hostile pattern costs pattern words × name words, not exponential time.
        let hostile = ExportList { functions: vec![format!("{}z", "#.*.".repeat(40))], ..ExportList::default() };
        assert!(!Exports::new(&hostile).unwrap().shares_function(&"a.".repeat(100)));
    }

    proptest! {
        #[test]
        fn an_allow_list_passes_exactly_its_members(
            allowed in proptest::collection::btree_set("[a-d]", 0..4),
            destination in "[a-d]",
        ) {
            let policy = RoutePolicy { allowed_destinations: Some(allowed.clone()), ..RoutePolicy::default() };
            prop_assert_eq!(policy.check(&destination, "x", &BTreeSet::new(), 0).is_ok(), allowed.contains(&destination));
        }
    }
}
