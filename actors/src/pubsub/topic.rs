//! Topic patterns and the subscription index, matched in bounded time.
//!
//! A topic is words separated by `.`; in a pattern `*` matches exactly one word and `#`
//! zero or more. Matched naively (try every split for every `#`), a pattern with k `#`s
//! costs about `topic_words^k`: `#.#.#.#.#.#.#.#.#.#.#.#.#.#.#.z` against fifteen `a`s
//! stalled a node for seconds. Here every match is bounded by
//! `O(pattern words × topic words)`:
//!
//! - a run of `#` is collapsed when the pattern is compiled (`#.#` means what `#` means);
//! - [`TopicPattern::matches`] is the greedy wildcard walk with one backtrack point (the
//!   last `#` seen): each backtrack moves the topic start of that `#` one word on, so the
//!   walk makes at most `(pattern words + 1) × (topic words + 1)` steps, in constant
//!   memory;
//! - [`TopicIndex`] is a trie of patterns walked as an automaton: at each topic word it
//!   keeps the *set* of trie nodes still alive (a `#` node stays alive on every word), so
//!   no node is visited twice for one position, and a publish costs at most
//!   `(index nodes) × (topic words + 1)` steps — for one pattern, its words times the
//!   topic's words.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// A compiled topic pattern (runs of `#` collapsed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    words: Vec<Box<str>>,
}

impl TopicPattern {
    /// Splits a pattern on `.` and collapses runs of `#`.
    pub fn new(pattern: &str) -> Self {
        let mut words: Vec<Box<str>> = Vec::new();
        for word in pattern.split('.') {
            if word == "#" && words.last().is_some_and(|last| &**last == "#") {
                continue;
            }
            words.push(word.into());
        }
        TopicPattern { words }
    }

    /// The pattern's words once compiled (after collapsing `#` runs).
    pub fn words(&self) -> impl Iterator<Item = &str> {
        self.words.iter().map(|w| &**w)
    }

    /// Whether `topic` matches (`*` one word, `#` zero or more).
    pub fn matches(&self, topic: &str) -> bool {
        let words: Vec<&str> = topic.split('.').collect();
        self.matches_words(&words).0
    }

    /// Whether the topic's `words` match, and the steps it took (at most
    /// `(pattern words + 1) × (topic words + 1)`).
    pub fn matches_words(&self, topic: &[&str]) -> (bool, usize) {
        let pattern = &self.words;
        let (mut p, mut t, mut steps) = (0, 0, 0);
        // The last `#` seen: the pattern index after it, and the topic index where the
        // words it swallows end (it has swallowed `topic[start..end]`).
        let mut backtrack: Option<(usize, usize)> = None;
        while t < topic.len() {
            steps += 1;
            match pattern.get(p).map(|w| &**w) {
                Some("#") => {
                    backtrack = Some((p + 1, t));
                    p += 1;
                }
                Some(word) if word == "*" || word == topic[t] => {
                    p += 1;
                    t += 1;
                }
                _ => match backtrack {
                    // Let the last `#` swallow one more word and retry what follows it.
                    Some((after, end)) => {
                        backtrack = Some((after, end + 1));
                        p = after;
                        t = end + 1;
                    }
                    None => return (false, steps),
                },
            }
        }
        while pattern.get(p).is_some_and(|w| &**w == "#") {
            p += 1;
            steps += 1;
        }
        (p == pattern.len(), steps)
    }
}

/// Patterns and their subscribers (keys `K`), as a trie with `*` and `#` edges.
#[derive(Debug)]
pub struct TopicIndex<K> {
    root: Node<K>,
}

#[derive(Debug)]
struct Node<K> {
    words: HashMap<Box<str>, Box<Node<K>>>,
    star: Option<Box<Node<K>>>,
    hash: Option<Box<Node<K>>>,
    subscribers: HashSet<K>,
}

impl<K> Default for Node<K> {
    fn default() -> Self {
        Node { words: HashMap::new(), star: None, hash: None, subscribers: HashSet::new() }
    }
}

impl<K> Default for TopicIndex<K> {
    fn default() -> Self {
        TopicIndex { root: Node::default() }
    }
}

impl<K> Node<K> {
    fn is_empty(&self) -> bool {
        self.words.is_empty() && self.star.is_none() && self.hash.is_none() && self.subscribers.is_empty()
    }

    /// Adds this node (reached at the current topic position) to `alive`, with the `#`
    /// child that can follow it without consuming a word. Only `#` nodes can be reached
    /// twice at one position (from their parent, and from themselves one word earlier):
    /// every other node has one parent and one edge from it, so only they need `seen`.
    fn enter<'a>(&'a self, via_hash: bool, alive: &mut Vec<(&'a Node<K>, bool)>, seen: &mut HashSet<*const Node<K>>) {
        if via_hash && !seen.insert(self as *const _) {
            return;
        }
        alive.push((self, via_hash));
        if let Some(hash) = &self.hash {
            hash.enter(true, alive, seen);
        }
    }
}

impl<K: Hash + Eq + Clone> TopicIndex<K> {
    /// Adds `key` under `pattern`.
    pub fn insert(&mut self, pattern: &TopicPattern, key: K) {
        let mut node = &mut self.root;
        for word in pattern.words() {
            node = match word {
                "*" => node.star.get_or_insert_with(Default::default),
                "#" => node.hash.get_or_insert_with(Default::default),
                word => node.words.entry(word.into()).or_default(),
            };
        }
        node.subscribers.insert(key);
    }

    /// Removes `key` from under `pattern`, pruning branches left empty.
    pub fn remove(&mut self, pattern: &TopicPattern, key: &K) {
        let words: Vec<&str> = pattern.words().collect();
        remove_from(&mut self.root, &words, key);
    }

    /// Whether no pattern is indexed.
    pub fn is_empty(&self) -> bool {
        self.root.is_empty()
    }

    /// Adds to `out` every key whose pattern matches the topic's `words`; returns the steps
    /// taken (alive nodes summed over positions, at most `nodes × (words + 1)`).
    pub fn collect(&self, words: &[&str], out: &mut HashSet<K>) -> usize {
        let mut seen = HashSet::new();
        let (mut alive, mut next) = (Vec::new(), Vec::new());
        self.root.enter(false, &mut alive, &mut seen);
        let mut steps = alive.len();
        for word in words {
            seen.clear();
            next.clear();
            for &(node, via_hash) in &alive {
                if via_hash {
                    // `#` swallows this word too.
                    node.enter(true, &mut next, &mut seen);
                }
                if let Some(child) = node.words.get(*word) {
                    child.enter(false, &mut next, &mut seen);
                }
                if let Some(star) = &node.star {
                    star.enter(false, &mut next, &mut seen);
                }
            }
            std::mem::swap(&mut alive, &mut next);
            steps += alive.len();
            if alive.is_empty() {
                return steps;
            }
        }
        for (node, _) in alive {
            out.extend(node.subscribers.iter().cloned());
        }
        steps
    }
}

fn remove_from<K: Hash + Eq>(node: &mut Node<K>, words: &[&str], key: &K) {
    let Some((word, rest)) = words.split_first() else {
        node.subscribers.remove(key);
        return;
    };
    let child = match *word {
        "*" => &mut node.star,
        "#" => &mut node.hash,
        word => {
            if let Some(child) = node.words.get_mut(word) {
                remove_from(child, rest, key);
                if child.is_empty() {
                    node.words.remove(word);
                }
            }
            return;
        }
    };
    if let Some(inner) = child {
        remove_from(inner, rest, key);
        if inner.is_empty() {
            *child = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, matched by brute force (exponential; small inputs only).
    fn reference(pattern: &[&str], topic: &[&str]) -> bool {
        match pattern.split_first() {
            None => topic.is_empty(),
            Some((&"#", rest)) => (0..=topic.len()).any(|skip| reference(rest, &topic[skip..])),
            Some((word, rest)) => match topic.split_first() {
                Some((first, tail)) => (*word == "*" || word == first) && reference(rest, tail),
                None => false,
            },
        }
    }

    #[test]
    fn wildcards() {
        let m = |p: &str, t: &str| TopicPattern::new(p).matches(t);
        assert!(m("demo.*", "demo.x") && !m("demo.*", "demo.x.y") && !m("demo.*", "demo"));
        assert!(m("demo.#", "demo") && m("demo.#", "demo.x.y") && m("#", "a.b"));
        assert!(m("a.#.z", "a.z") && m("a.#.z", "a.b.c.z") && !m("a.#.z", "a.b"));
        assert!(m("*.b.#", "a.b") && !m("*.b.#", "b"));
        assert!(m("#.#.a", "a") && m("#.*.#", "x") && !m("#.*.#.*", "x"));
    }

    #[test]
    fn hash_runs_collapse() {
        let pattern = TopicPattern::new("#.#.#.a.#.#");
        assert_eq!(pattern.words().collect::<Vec<_>>(), ["#", "a", "#"]);
    }

    /// The attack of issue 6: 15 `#`s then `z`, against 15 `a`s. Naively about 4^15
    /// steps; here bounded by pattern words × topic words, for both matchers.
    #[test]
    fn hostile_pattern_is_linear_in_its_size() {
        let pattern_text = format!("{}z", "#.".repeat(15));
        let topic: Vec<&str> = vec!["a"; 15];
        let pattern = TopicPattern::new(&pattern_text);
        assert_eq!(pattern.words().count(), 2, "the run of # collapses to one");
        let (matched, steps) = pattern.matches_words(&topic);
        assert!(!matched);
        assert!(steps <= 3 * 16, "{steps} steps");
        // Even uncollapsed (a pattern as the trie sees it word by word), the automaton
        // visits each node at most once per position.
        let mut index = TopicIndex::default();
        index.insert(&pattern, 1);
        let mut out = HashSet::new();
        let steps = index.collect(&topic, &mut out);
        assert!(out.is_empty());
        assert!(steps <= 3 * 16, "{steps} steps");
        // Not collapsible: `#.a` repeated, same bound.
        let spread = TopicPattern::new(&format!("{}z", "#.a.".repeat(15)));
        let (matched, steps) = spread.matches_words(&topic);
        assert!(!matched);
        assert!(steps <= 32 * 16, "{steps} steps");
        let mut index = TopicIndex::default();
        index.insert(&spread, 1);
        let steps = index.collect(&topic, &mut out);
        assert!(out.is_empty() && steps <= 32 * 16, "{steps} steps");
    }

    fn word() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just("a"), Just("b"), Just("c")]
    }

    fn pattern_word() -> impl Strategy<Value = &'static str> {
        prop_oneof![word(), Just("*"), Just("#"), Just("#")]
    }

    proptest! {
        /// The greedy matcher agrees with the definition, within its step bound.
        #[test]
        fn matcher_agrees_with_reference(
            pattern in proptest::collection::vec(pattern_word(), 1..7),
            topic in proptest::collection::vec(word(), 0..7),
        ) {
            let compiled = TopicPattern::new(&pattern.join("."));
            let (matched, steps) = compiled.matches_words(&topic);
            prop_assert_eq!(matched, reference(&pattern, &topic));
            prop_assert!(steps <= (pattern.len() + 1) * (topic.len() + 1));
        }

        /// The index finds exactly the keys whose pattern matches by the definition, and
        /// stays consistent as patterns are removed.
        #[test]
        fn index_agrees_with_reference(
            patterns in proptest::collection::vec(proptest::collection::vec(pattern_word(), 1..6), 1..8),
            topic in proptest::collection::vec(word(), 1..7),
            removed in 0usize..8,
        ) {
            let mut index = TopicIndex::default();
            let compiled: Vec<TopicPattern> = patterns.iter().map(|p| TopicPattern::new(&p.join("."))).collect();
            for (i, p) in compiled.iter().enumerate() {
                index.insert(p, i);
            }
            if removed < compiled.len() {
                index.remove(&compiled[removed], &removed);
            }
            let expected: HashSet<usize> = patterns
                .iter()
                .enumerate()
                .filter(|(i, p)| *i != removed && reference(p, &topic))
                .map(|(i, _)| i)
                .collect();
            let mut found = HashSet::new();
            let steps = index.collect(&topic, &mut found);
            prop_assert_eq!(found, expected);
            let nodes: usize = compiled.iter().map(|p| p.words().count() + 1).sum();
            prop_assert!(steps <= nodes * (topic.len() + 1));
            for (i, p) in compiled.iter().enumerate() {
                index.remove(p, &i);
            }
            prop_assert!(index.is_empty());
        }
    }
}
