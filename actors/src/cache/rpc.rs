//! RPC result caching: a command with `"cache": {"ttl": S}` (or one that calls a function
//! registered `cacheable`) is served from this node's cache when it can be, and identical
//! calls that arrive while one runs wait for it instead of running again (single flight).
//!
//! The key is `sha256(canonical_json({"fun", "function_id", "version", "args", "kwargs"}))`
//! of the resolved function — so a new version never serves an old version's results —
//! in namespace [`NAMESPACE`] of this node's L1 and L2. Only successful results are
//! stored; a failure is handed to the calls that waited on it and forgotten.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use super::core::canonical_json;
use crate::function::FunctionIdentity;
use crate::protocol::RpcError;

/// The cache namespace of RPC results.
pub const NAMESPACE: &str = "rpc";

/// The cache key of a call: hex sha256 of the canonical identity and arguments.
pub fn call_key(identity: &FunctionIdentity, args: &[Value], kwargs: &Map<String, Value>) -> String {
    let described = json!({
        "fun": identity.name,
        "function_id": identity.function_id,
        "version": identity.version.to_string(),
        "args": args,
        "kwargs": kwargs,
    });
    let digest = Sha256::digest(canonical_json(&described).as_bytes());
    crate::fabric::trust::to_hex(&digest)
}

type Waiters = Vec<oneshot::Sender<Result<Value, RpcError>>>;

/// Calls being computed, by key, with the identical calls waiting for them.
#[derive(Debug, Default)]
pub struct SingleFlight {
    running: Mutex<HashMap<String, Waiters>>,
}

/// A call's part in its flight.
pub enum Flight<'a> {
    /// Compute it, then [`Leader::finish`].
    Leader(Leader<'a>),
    /// Wait for the leader's result.
    Follower(oneshot::Receiver<Result<Value, RpcError>>),
}

impl SingleFlight {
    /// Joins the flight of `key`: the first call leads, the others follow.
    pub fn join(&self, key: &str) -> Flight<'_> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        match running.get_mut(key) {
            Some(waiters) => {
                let (tx, rx) = oneshot::channel();
                waiters.push(tx);
                Flight::Follower(rx)
            }
            None => {
                running.insert(key.to_owned(), Vec::new());
                Flight::Leader(Leader { flight: self, key: key.to_owned(), done: false })
            }
        }
    }

    /// Calls waiting for another identical call's result now.
    pub fn followers(&self) -> usize {
        self.running.lock().map(|r| r.values().map(Vec::len).sum()).unwrap_or(0)
    }

    /// Calls in flight now.
    pub fn len(&self) -> usize {
        self.running.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// Whether none is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn land(&self, key: &str, result: &Result<Value, RpcError>) {
        let waiters = self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(key).unwrap_or_default();
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }
}

/// The call that computes a flight's result. Dropped without [`Leader::finish`] (its
/// request was cancelled), it fails the waiting calls rather than leave them hanging.
pub struct Leader<'a> {
    flight: &'a SingleFlight,
    key: String,
    done: bool,
}

impl Leader<'_> {
    /// Hands `result` to every call that waited for it.
    pub fn finish(mut self, result: &Result<Value, RpcError>) {
        self.done = true;
        self.flight.land(&self.key, result);
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if !self.done {
            let cancelled = RpcError::unreachable("the identical call this one waited for was cancelled; retry");
            self.flight.land(&self.key, &Err(cancelled));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(version: &str) -> FunctionIdentity {
        FunctionIdentity {
            name: "f".into(),
            function_id: "f".into(),
            version: version.parse().unwrap(),
            resources: Default::default(),
        }
    }

    #[test]
    fn keys_follow_identity_and_canonical_arguments() {
        let kw = |v: Value| v.as_object().cloned().unwrap();
        let a = call_key(&identity("1.0.0"), &[json!({"b": 1, "a": 2})], &kw(json!({"x": 1, "y": 2})));
        let b = call_key(&identity("1.0.0"), &[json!({"a": 2, "b": 1})], &kw(json!({"y": 2, "x": 1})));
        assert_eq!(a, b, "key order does not matter");
        assert_ne!(a, call_key(&identity("1.0.1"), &[json!({"a": 2, "b": 1})], &kw(json!({"y": 2, "x": 1}))));
        assert_ne!(a, call_key(&identity("1.0.0"), &[json!({"a": 2, "b": 2})], &kw(json!({"y": 2, "x": 1}))));
        assert_eq!(a.len(), 64);
    }

    #[tokio::test]
    async fn followers_get_the_leaders_result_and_a_cancelled_leader_fails_them() {
        let flights = SingleFlight::default();
        let Flight::Leader(leader) = flights.join("k") else { panic!("first leads") };
        let Flight::Follower(f1) = flights.join("k") else { panic!("second follows") };
        let Flight::Follower(f2) = flights.join("k") else { panic!("third follows") };
        leader.finish(&Ok(json!(7)));
        assert_eq!(f1.await.unwrap(), Ok(json!(7)));
        assert_eq!(f2.await.unwrap(), Ok(json!(7)));
        assert!(flights.is_empty());
        let Flight::Leader(leader) = flights.join("k") else { panic!("a new flight") };
        let Flight::Follower(f3) = flights.join("k") else { panic!("follows") };
        drop(leader);
        assert!(f3.await.unwrap().is_err());
        assert!(flights.is_empty());
    }
}
