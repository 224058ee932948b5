//! Lanes: more links to a bridge we dial, one on each thread of the node's websocket
//! listener.
//!
//! Why: a client's call for another cluster is read on the listener thread serving its
//! websocket, and a call relayed through this cluster on the thread serving the bridge it
//! came on. If the bridge it leaves on were served by another thread, the call would wake
//! that thread, and its reply this one again: on a small machine each such wake-up costs
//! more than the call itself. A call goes out on the bridge its own thread serves when
//! there is one ([`super::bridge::Bridges`] picks it), so a call, its relays and their
//! replies stay on one thread in each node.
//!
//! How:
//! - The bridge to a configured federation peer is dialled from the first listener thread
//!   (from the fabric's thread when none has started); once it is admitted, a lane is
//!   dialled from each listener thread that serves no link to that URL, through the same
//!   handshake: to the other side it is one more bridge to the same node. On the side that
//!   accepts, actix spreads the incoming links over its threads (usually one each, with
//!   no guarantee).
//! - A lane lives and dies with that bridge: when it closes, its lanes are closed; a lane
//!   that completes its handshake after the bridge closed is closed at once. A failed lane
//!   is dialled again with the same backoff as any dial.
//! - The links a node dials to another cluster are pinged every [`BRIDGE_KEEPALIVE`], or
//!   four times per silent limit ([`super::bridge::Bridges::silent_limit`]) when that is
//!   more often. Both ends count pings and pongs as hearing from a bridge, so a lane,
//!   which carries no announcements, is not closed as silent, and one whose other end is
//!   gone is.
//! - A node's lanes share one `max_in_flight_per_link`; one node may hold at most
//!   [`MAX_BRIDGE_LINKS_PER_NODE`] bridge links to this one.
//! - Like any bridge, a lane gets the key chain and an announcement round when it opens
//!   (its other end may be a new process of a node bridged already); later announcements
//!   go on one link per node.

use std::collections::HashSet;
use std::future::Future;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use super::link::{self, LinkId};
use super::{DialEnded, DialState, FabricGossip};

/// How often, at most, a link this node dialled to another cluster is pinged (more often
/// when a quarter of the silent limit is shorter): often enough for an acceptor whose
/// silent limit is a few seconds, as the other cluster's settings may make it.
pub const BRIDGE_KEEPALIVE: Duration = Duration::from_secs(1);

/// Bridge links one node of another cluster may hold to this one: its bridge, and a lane
/// per listener thread (beyond: refused, `bridge_links`).
pub const MAX_BRIDGE_LINKS_PER_NODE: usize = link::MAX_LISTENER_THREADS + 1;

impl FabricGossip {
    /// The dial state of `url` (a lane of its bridge when `lane` is set).
    pub(super) fn dial_state(&mut self, url: &str, lane: Option<usize>) -> Option<&mut DialState> {
        match lane {
            Some(lane) => self.lanes.get_mut(&(url.to_owned(), lane)),
            None => self.dials.get_mut(url),
        }
    }

    /// Dials `url` (as `lane` of its bridge when set) on the thread that runs the returned
    /// task, and reports the end to this actor.
    pub(super) fn dial_task(&self, url: String, lane: Option<usize>) -> impl Future<Output = ()> + Send + 'static {
        let keepalive = match &self.shared.bridges {
            Some(bridges) if self.config.federation_peers.contains(&url) => {
                Some((bridges.silent_limit() / 4).clamp(Duration::from_millis(100), BRIDGE_KEEPALIVE))
            }
            _ => None,
        };
        let incarnation = self.incarnation;
        let spec = link::DialSpec {
            url: url.clone(),
            timeout: self.config.dial_timeout,
            queue: self.config.link_queue,
            lane,
            keepalive,
            incarnation,
        };
        let shared = self.shared.clone();
        async move {
            let result = link::dial(spec, shared.clone()).await;
            if let Some(gossip) = shared.gossip.get() {
                gossip.do_send(DialEnded { incarnation, url, lane, error: result.err() });
            }
        }
    }

    /// The admitted bridges we dialled get a lane on each listener thread that has none
    /// (when due); lanes whose bridge is gone are closed. Called every round, and as soon
    /// as a bridge we dialled is admitted.
    pub(super) fn dial_lanes(&mut self) {
        if self.leaving {
            return;
        }
        let bridges: HashSet<String> = self
            .links
            .values()
            .filter(|l| l.lane.is_none() && l.bridge.is_some())
            .filter_map(|l| l.outbound_url.clone())
            .collect();
        let orphans: Vec<LinkId> = self.links.keys().copied().filter(|link| self.orphan_lane(*link)).collect();
        for link in orphans {
            self.close_link(link);
        }
        // The threads serving a link to each URL (the bridge and its lanes).
        let served: HashSet<(&str, ThreadId)> =
            self.links.values().filter_map(|l| Some((l.outbound_url.as_deref()?, l.thread))).collect();
        let mut due = Vec::new();
        let now = Instant::now();
        for url in &bridges {
            for (lane, (id, thread)) in self.shared.listener_threads().into_iter().enumerate() {
                let key = (url.clone(), lane);
                let waiting = self.lanes.get(&key).is_some_and(|d| d.in_progress || d.next_at > now);
                if !served.contains(&(url.as_str(), id)) && !waiting {
                    due.push((key, thread));
                }
            }
        }
        for (key, thread) in due {
            let task = self.dial_task(key.0.clone(), Some(key.1));
            let max_backoff = self.config.max_backoff;
            let dial = self.lanes.entry(key).or_insert_with(|| DialState::due_now(false));
            dial.next_at = now + dial.double_backoff(max_backoff);
            // A listener thread that stopped takes no task: tried again next round.
            dial.in_progress = thread.spawn(task);
        }
        self.lanes.retain(|(url, _), d| d.in_progress || bridges.contains(url));
    }

    /// Whether `link` is a lane whose bridge is not open (admitted) now.
    pub(super) fn orphan_lane(&self, link: LinkId) -> bool {
        let Some(url) = self.links.get(&link).filter(|l| l.lane.is_some()).and_then(|l| l.outbound_url.as_ref()) else {
            return false;
        };
        !self.links.values().any(|l| l.lane.is_none() && l.bridge.is_some() && l.outbound_url.as_ref() == Some(url))
    }

    /// The link we dialled `link` is refused: its next dial waits the longest backoff. Its
    /// dial state, if it has one.
    pub(super) fn back_off(&mut self, link: LinkId) -> Option<&mut DialState> {
        let (url, lane) = self.links.get(&link).and_then(|l| Some((l.outbound_url.clone()?, l.lane)))?;
        let max_backoff = self.config.max_backoff;
        let dial = self.dial_state(&url, lane)?;
        dial.backoff = max_backoff;
        dial.next_at = Instant::now() + max_backoff;
        Some(dial)
    }

    /// The bridge we dialled to `url` closed: so do its lanes.
    pub(super) fn close_lanes(&mut self, url: &str) {
        let lanes: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.lane.is_some() && l.outbound_url.as_deref() == Some(url))
            .map(|(id, _)| *id)
            .collect();
        for link in lanes {
            self.close_link(link);
        }
    }
}
