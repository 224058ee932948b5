//! SWIM membership with Lifeguard's local health: the failure detector and dissemination
//! whose cost per member does not grow with the cluster (issue 10). A pure state machine:
//! no sockets, no clock, no global randomness — time is passed in, randomness comes from a
//! seeded generator, and every call returns the messages to send. [`simulation`] runs
//! thousands of them in one process.
//!
//! # The protocol (Das, Gupta, Motivala 2002; memberlist; Lifeguard)
//!
//! Each protocol period a member probes ONE other member. The targets follow a rotation
//! on a clock the members share (as Rapid's monitoring rings do): in period `k` of that
//! clock, the member at place `i` of the sorted list of live members probes the one at
//! place `i + 1 + k mod (n - 1)`. Members that agree on the list thus probe a permutation
//! of it: **every member is probed once a period**, so a silent one is found within about
//! a period wherever its probers' periods fall, not after a random wait whose tail grows
//! with chance (with random targets a member goes unprobed for a whole period with
//! probability (1 - 1/(n-1))^(n-1) ≈ 0.37). Each member still probes every other one
//! within `n - 1` periods (SWIM's round-robin bound), and where views differ (a join on
//! its way) a member is at worst probed twice or not at all in a period.
//!
//! ```text
//!  A ──ping(seq)──► B            B answers ack(seq)
//!  no ack within probe_timeout:  A ──ping-req(seq, B)──► k others ──ping──► B
//!                                each relays B's ack back to A as ack(seq)
//!  no ack by the period's end:   A suspects B (rumor Suspect(B, inc))
//!  Suspect not refuted within the suspicion timeout: Dead(B, inc)
//! ```
//!
//! - **Incarnations.** Only a member raises its own incarnation: when it hears a rumor
//!   that it is suspect (or dead) at its current incarnation, it refutes with
//!   `Alive(me, inc + 1)`. Precedence between rumors about one member: a higher
//!   incarnation wins; at equal incarnation `Left` > `Dead` > `Suspect` > `Alive` (a
//!   total order, so the order rumors arrive in never changes the outcome). A dead
//!   member comes back only with a higher incarnation (a restart), never through stale
//!   gossip.
//! - **Dissemination.** Every change is a rumor, piggybacked on pings and acks (at most
//!   `max_piggyback` per message, the least transmitted first) and retransmitted
//!   `ceil(retransmit_mult · log10(n + 1))` times; a newer rumor about the same member
//!   replaces the older. A rumor therefore reaches everyone in O(log n) periods while each
//!   message stays bounded.
//! - **Push-pull.** Every `push_pull_every` periods a member exchanges its whole list with
//!   one random member, repairing whatever the rumors missed; a joiner does it with its
//!   seed first.
//! - **Local health** (Lifeguard). A member whose own probes go unanswered, or which has
//!   to refute suspicion of itself, is more likely slow than surrounded by dead members:
//!   its health multiplier (0..=`max_local_health`) rises, and stretches its probe timeout
//!   and its suspicion timeouts, so a loaded machine accuses others later. Successful
//!   probes bring it back down.
//!
//! Per member and period: one ping and its ack, plus `k` ping-reqs (and their relays) when
//! a probe fails, plus one push-pull every `push_pull_every` periods — constant in n.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

pub mod simulation;
#[cfg(test)]
mod tests;

/// A member's name.
pub type MemberId = String;
/// How many times a member has refuted suspicion of itself (or restarted).
pub type Incarnation = u64;

/// What a rumor says about a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Answering.
    Alive,
    /// A probe of it failed; dead unless it refutes in time.
    Suspect,
    /// Declared dead after its suspicion timed out.
    Dead,
    /// Said GOODBYE.
    Left,
}

impl Liveness {
    /// Precedence at equal incarnation.
    fn rank(self) -> u8 {
        match self {
            Liveness::Alive => 0,
            Liveness::Suspect => 1,
            Liveness::Dead => 2,
            Liveness::Left => 3,
        }
    }

    /// Dead or left: no longer probed, routed to or counted.
    pub fn is_gone(self) -> bool {
        matches!(self, Liveness::Dead | Liveness::Left)
    }
}

/// One piece of membership news.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rumor {
    /// About whom.
    pub member: MemberId,
    /// At which of its incarnations.
    pub incarnation: Incarnation,
    /// What it says.
    pub liveness: Liveness,
}

impl Rumor {
    /// Whether this rumor replaces what is known (`known`: incarnation and liveness).
    fn overrides(&self, known: (Incarnation, Liveness)) -> bool {
        let (inc, liveness) = known;
        self.incarnation > inc || (self.incarnation == inc && self.liveness.rank() > liveness.rank())
    }
}

/// What members send each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SwimMessage {
    /// Are you there? Answered by an `ack` with the same `seq`.
    Ping {
        /// The prober's sequence number.
        seq: u64,
        /// Piggybacked news.
        rumors: Vec<Rumor>,
    },
    /// Probe `target` for me; relay its ack with my `seq`.
    PingReq {
        /// The requester's sequence number.
        seq: u64,
        /// Whom to probe.
        target: MemberId,
        /// Piggybacked news.
        rumors: Vec<Rumor>,
    },
    /// I am there (or, relayed: the target is there).
    Ack {
        /// The sequence number of the ping (or ping-req) answered.
        seq: u64,
        /// Piggybacked news.
        rumors: Vec<Rumor>,
    },
    /// News only, not answered: sent by [`Swim::gossip`] to a few random members when
    /// news is waiting, so it spreads faster than one probe a period carries it.
    Gossip {
        /// The news.
        rumors: Vec<Rumor>,
    },
    /// My whole list; answered with the receiver's own when `reply`.
    PushPull {
        /// Every member the sender knows, itself included.
        members: Vec<Rumor>,
        /// Whether the receiver should answer with its list.
        reply: bool,
    },
}

/// A message to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// To whom.
    pub to: MemberId,
    /// What.
    pub message: SwimMessage,
}

/// A change of a member's state, as this member sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Whose.
    pub member: MemberId,
    /// Its new state.
    pub liveness: Liveness,
    /// At which incarnation.
    pub incarnation: Incarnation,
}

/// Timing and bounds. Times in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct SwimConfig {
    /// One protocol period: one probe.
    pub period: f64,
    /// A direct probe unanswered this long (times `1 + local health`) goes indirect.
    pub probe_timeout: f64,
    /// Members asked to probe indirectly.
    pub indirect_probes: usize,
    /// Suspicion lasts `suspicion_mult · log10(max(n, 10))` periods (times `1 + local
    /// health`) before the member is declared dead.
    pub suspicion_mult: f64,
    /// Each rumor is sent `ceil(retransmit_mult · log10(n + 1))` times.
    pub retransmit_mult: f64,
    /// Rumors per message, at most.
    pub max_piggyback: usize,
    /// Rumors waiting to be sent, at most (the most transmitted are dropped first; the
    /// periodic push-pull repairs what they carried).
    pub max_pending_rumors: usize,
    /// A push-pull every this many periods (0: never, except the join).
    pub push_pull_every: u32,
    /// Members in a push-pull, at most.
    pub max_push_pull_members: usize,
    /// Highest local health multiplier.
    pub max_local_health: u32,
    /// Dead and left members are remembered this long (so stale rumors cannot resurrect
    /// them), then forgotten.
    pub gone_retention: f64,
}

impl Default for SwimConfig {
    fn default() -> Self {
        SwimConfig {
            period: 1.0,
            probe_timeout: 0.4,
            indirect_probes: 3,
            suspicion_mult: 3.0,
            retransmit_mult: 4.0,
            max_piggyback: 16,
            max_pending_rumors: 4096,
            push_pull_every: 30,
            max_push_pull_members: 4096,
            max_local_health: 8,
            gone_retention: 120.0,
        }
    }
}

/// Items waiting to be piggybacked, at most one per key (a member), ordered by
/// (transmissions, newest first): taking the next `k` and putting them back is O(k log n).
/// SWIM's rumors use it, and so does the fabric for the member records and catalog
/// entries it piggybacks on SWIM's messages.
#[derive(Debug)]
pub struct RetransmitQueue<T> {
    queue: BTreeMap<(u32, Reverse<u64>), (String, T)>,
    key_of: HashMap<String, (u32, Reverse<u64>)>,
    next: u64,
}

impl<T> Default for RetransmitQueue<T> {
    fn default() -> Self {
        RetransmitQueue { queue: BTreeMap::new(), key_of: HashMap::new(), next: 0 }
    }
}

impl<T: Clone> RetransmitQueue<T> {
    /// Items waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether none are waiting.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Drops every item.
    pub fn clear(&mut self) {
        self.queue.clear();
        self.key_of.clear();
    }

    /// Queues `item` under `key`, replacing the one with the same key; when `max` are
    /// queued the most transmitted goes (it has had the most chances already).
    pub fn push(&mut self, key: &str, item: T, max: usize) {
        if let Some(at) = self.key_of.remove(key) {
            self.queue.remove(&at);
        }
        if self.queue.len() >= max.max(1) {
            if let Some((_, (dropped, _))) = self.queue.pop_last() {
                self.key_of.remove(&dropped);
            }
        }
        self.next += 1;
        let at = (0, Reverse(self.next));
        self.key_of.insert(key.to_owned(), at);
        self.queue.insert(at, (key.to_owned(), item));
    }

    /// The next `k` items; each counts one transmission and is dropped at `limit`.
    pub fn take(&mut self, k: usize, limit: u32) -> Vec<T> {
        let keys: Vec<(u32, Reverse<u64>)> = self.queue.keys().take(k).copied().collect();
        let mut picked = Vec::with_capacity(keys.len());
        for at in keys {
            let Some((key, item)) = self.queue.remove(&at) else { continue };
            let sent = at.0 + 1;
            if sent < limit {
                let again = (sent, at.1);
                self.key_of.insert(key.clone(), again);
                self.queue.insert(again, (key, item.clone()));
            } else {
                self.key_of.remove(&key);
            }
            picked.push(item);
        }
        picked
    }
}

/// `news` at the head of `rumors` (replacing rumors about the same members), keeping at
/// most `max` (at least one).
fn put_first(rumors: &mut Vec<Rumor>, news: Vec<Rumor>, max: usize) {
    rumors.retain(|r| !news.iter().any(|n| n.member == r.member));
    rumors.splice(0..0, news);
    rumors.truncate(max.max(1));
}

/// One known member.
#[derive(Debug, Clone, PartialEq)]
struct Known {
    incarnation: Incarnation,
    liveness: Liveness,
    /// When it became suspect, or gone (for the timeouts).
    since: f64,
}

/// The probe of this period.
#[derive(Debug, Clone)]
struct Probe {
    target: MemberId,
    seq: u64,
    sent_at: f64,
    indirect_sent: bool,
    acked: bool,
}

/// A ping sent on behalf of a ping-req: its ack goes back to `requester` as `seq`.
#[derive(Debug, Clone)]
struct Relay {
    requester: MemberId,
    seq: u64,
    until: f64,
}

/// One member's view and protocol state.
#[derive(Debug)]
pub struct Swim {
    me: MemberId,
    incarnation: Incarnation,
    config: SwimConfig,
    members: BTreeMap<MemberId, Known>,
    /// Members now suspect (for the suspicion timeouts).
    suspects: BTreeSet<MemberId>,
    /// How many of `members` are dead or left.
    gone: usize,
    /// Rumors to piggyback, least sent first and, among those, newest first.
    rumors: RetransmitQueue<Rumor>,
    probe: Option<Probe>,
    /// When this period started; periods follow each other without drift, so that each
    /// starts in the next period of the shared clock.
    period_start: f64,
    /// `now + clock_offset` is the clock all members share (see [`Swim::share_clock`]).
    clock_offset: f64,
    /// The rotation's place of the last probe (see [`Swim::next_target`]).
    last_slot: Option<i64>,
    periods: u64,
    next_seq: u64,
    relays: HashMap<u64, Relay>,
    local_health: u32,
    rng: StdRng,
    /// Messages sent, by kind, for the benchmarks: ping, ping-req, ack, push-pull.
    sent: [u64; 5],
}

impl Swim {
    /// Member `me`, alone, at `now`; `seed` drives its random choices.
    pub fn new(me: impl Into<MemberId>, config: SwimConfig, now: f64, seed: u64) -> Swim {
        Swim {
            me: me.into(),
            incarnation: 0,
            config,
            members: BTreeMap::new(),
            suspects: BTreeSet::new(),
            gone: 0,
            rumors: RetransmitQueue::default(),
            probe: None,
            period_start: now,
            clock_offset: 0.0,
            last_slot: None,
            periods: 0,
            next_seq: 0,
            relays: HashMap::new(),
            local_health: 0,
            rng: StdRng::seed_from_u64(seed),
            sent: [0; 5],
        }
    }

    /// Takes `now + offset` as the clock the members share, on which the probe targets
    /// rotate (a node passes the Unix time of its own clock's zero). Without it `now`
    /// itself is taken as shared, as in the simulation.
    pub fn share_clock(mut self, offset: f64) -> Swim {
        self.clock_offset = offset;
        self
    }

    /// This member's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Its incarnation.
    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    /// Its local health multiplier (0: healthy).
    pub fn local_health(&self) -> u32 {
        self.local_health
    }

    /// What it believes about `member` (None: never heard of, or forgotten).
    pub fn liveness_of(&self, member: &str) -> Option<Liveness> {
        self.members.get(member).map(|k| k.liveness)
    }

    /// Members it believes alive or suspect (itself excluded), in name order.
    pub fn live_members(&self) -> impl Iterator<Item = (&str, Liveness)> {
        self.members.iter().filter(|(_, k)| !k.liveness.is_gone()).map(|(m, k)| (m.as_str(), k.liveness))
    }

    /// Messages sent so far: (pings, ping-reqs, acks, push-pulls, gossips).
    pub fn messages_sent(&self) -> (u64, u64, u64, u64, u64) {
        (self.sent[0], self.sent[1], self.sent[2], self.sent[3], self.sent[4])
    }

    /// memberlist's gossip round: when news is waiting (or `always`), a [`SwimMessage::Gossip`]
    /// of it to each of `fanout` random members alive or suspect. Nothing when there is no news, so an
    /// idle cluster sends only probes; with news, a node sends `fanout` more messages.
    pub fn gossip(&mut self, fanout: usize, always: bool) -> Vec<Outgoing> {
        if self.rumors.is_empty() && !always {
            return Vec::new();
        }
        // Suspects too (as memberlist does): told that they are, they refute at once.
        let mut targets: Vec<MemberId> =
            self.members.iter().filter(|(_, k)| !k.liveness.is_gone()).map(|(m, _)| m.clone()).collect();
        targets.shuffle(&mut self.rng);
        targets.truncate(fanout);
        targets
            .into_iter()
            .map(|to| {
                let rumors = self.piggyback();
                self.send(&to, SwimMessage::Gossip { rumors })
            })
            .collect()
    }

    /// Rumors waiting to be piggybacked.
    pub fn pending_rumors(&self) -> usize {
        self.rumors.len()
    }

    /// The incarnation it knows `member` at.
    pub fn incarnation_of(&self, member: &str) -> Option<Incarnation> {
        self.members.get(member).map(|k| k.incarnation)
    }

    /// Learns `rumor` from outside the protocol (a member met on a link, a checked
    /// GOODBYE), with the usual precedence; spreads it if it changed something.
    pub fn learn(&mut self, rumor: Rumor, now: f64) -> Vec<Transition> {
        let mut changes = Vec::new();
        self.apply(rumor, now, &mut changes);
        changes
    }

    /// Suspects `member` at once (its link dropped): a `Suspect` rumor at the incarnation
    /// known, which it refutes if it is alive.
    pub fn suspect(&mut self, member: &str, now: f64) -> Vec<Transition> {
        match self.members.get(member) {
            Some(k) if k.liveness == Liveness::Alive => {
                let rumor =
                    Rumor { member: member.to_owned(), incarnation: k.incarnation, liveness: Liveness::Suspect };
                self.learn(rumor, now)
            }
            _ => Vec::new(),
        }
    }

    /// Joins through `seed`: a push-pull of this member's list (itself).
    pub fn join(&mut self, seed: &str) -> Vec<Outgoing> {
        let members = self.full_list();
        vec![self.send(seed, SwimMessage::PushPull { members, reply: true })]
    }

    /// Says GOODBYE: a `Left` rumor about itself, pushed to up to `fanout` live members
    /// at once (the caller stops this member afterwards).
    pub fn leave(&mut self, fanout: usize) -> Vec<Outgoing> {
        let rumor = Rumor { member: self.me.clone(), incarnation: self.incarnation, liveness: Liveness::Left };
        let mut targets: Vec<MemberId> = self.live_members().map(|(m, _)| m.to_owned()).collect();
        targets.shuffle(&mut self.rng);
        targets.truncate(fanout);
        targets
            .into_iter()
            .map(|to| self.send(&to, SwimMessage::PushPull { members: vec![rumor.clone()], reply: false }))
            .collect()
    }

    /// Runs the timers due at `now`: the probe's indirect stage, the end of the period
    /// (suspect an unanswered target, start the next probe), suspicion timeouts, relays.
    pub fn tick(&mut self, now: f64) -> (Vec<Outgoing>, Vec<Transition>) {
        let mut out = Vec::new();
        let mut changes = Vec::new();
        let health = f64::from(1 + self.local_health);
        if let Some(probe) = &self.probe {
            if !probe.acked && !probe.indirect_sent && now - probe.sent_at >= self.config.probe_timeout * health {
                let (target, seq) = (probe.target.clone(), probe.seq);
                if let Some(p) = self.probe.as_mut() {
                    p.indirect_sent = true;
                }
                out.extend(self.indirect_probe(&target, seq));
            }
        }
        let period = self.config.period * health;
        if now - self.period_start >= period {
            out.extend(self.end_period(now, &mut changes));
            // The next period starts where this one ended, not when the timer noticed
            // (a period late by more than a period starts afresh now).
            self.period_start = if now - self.period_start < 2.0 * period { self.period_start + period } else { now };
            self.periods += 1;
            out.extend(self.start_probe(now));
            out.extend(self.remind_suspects(now));
            let every = u64::from(self.config.push_pull_every);
            if every > 0 && self.periods % every == 0 {
                out.extend(self.push_pull());
            }
            self.forget_gone(now);
            self.relays.retain(|_, r| r.until > now);
        }
        self.expire_suspicions(now, &mut changes);
        (out, changes)
    }

    /// This member could not watch for `lost` seconds: its own event loop stalled (the
    /// caller's timers fired that late), so answers may be waiting unread. Time it was not
    /// looking is not counted against others: the probe in flight, the period and the
    /// suspicions it times are pushed back by `lost`. (Local health is left to the probes:
    /// a member starved all the time still fails its probes, and accuses later for it.)
    pub fn stalled(&mut self, lost: f64) {
        if lost.is_nan() || lost <= 0.0 {
            return;
        }
        if let Some(probe) = self.probe.as_mut() {
            probe.sent_at += lost;
        }
        self.period_start += lost;
        for member in &self.suspects {
            if let Some(known) = self.members.get_mut(member) {
                known.since += lost;
            }
        }
    }

    /// Handles `message` from `from` at `now`.
    pub fn receive(&mut self, from: &str, message: SwimMessage, now: f64) -> (Vec<Outgoing>, Vec<Transition>) {
        let mut out = Vec::new();
        let mut changes = Vec::new();
        // What the sender is behind on; told back in the answer, or in a message of its own.
        let behind = match message {
            SwimMessage::Ping { seq, rumors } => {
                self.hear_from(from, now, &mut changes);
                let behind = self.apply_all(rumors, now, &mut changes);
                let mut rumors = self.piggyback();
                put_first(&mut rumors, behind, self.config.max_piggyback);
                out.push(self.send(from, SwimMessage::Ack { seq, rumors }));
                Vec::new()
            }
            SwimMessage::PingReq { seq, target, rumors } => {
                self.hear_from(from, now, &mut changes);
                let behind = self.apply_all(rumors, now, &mut changes);
                let relay_seq = self.fresh_seq();
                let until = now + self.config.period * f64::from(1 + self.config.max_local_health);
                self.relays.insert(relay_seq, Relay { requester: from.to_owned(), seq, until });
                let rumors = self.piggyback();
                out.push(self.send(&target, SwimMessage::Ping { seq: relay_seq, rumors }));
                behind
            }
            SwimMessage::Ack { seq, rumors } => {
                self.hear_from(from, now, &mut changes);
                let behind = self.apply_all(rumors, now, &mut changes);
                if let Some(relay) = self.relays.remove(&seq) {
                    let rumors = self.piggyback();
                    out.push(self.send(&relay.requester, SwimMessage::Ack { seq: relay.seq, rumors }));
                } else if let Some(probe) = self.probe.as_mut().filter(|p| p.seq == seq && !p.acked) {
                    probe.acked = true;
                    self.local_health = self.local_health.saturating_sub(1);
                }
                behind
            }
            SwimMessage::Gossip { rumors } => {
                self.hear_from(from, now, &mut changes);
                let bounded = rumors.into_iter().take(self.config.max_piggyback).collect();
                self.apply_all(bounded, now, &mut changes)
            }
            SwimMessage::PushPull { members, reply } => {
                let bounded = members.into_iter().take(self.config.max_push_pull_members).collect();
                let behind = self.apply_all(bounded, now, &mut changes);
                if reply {
                    let members = self.full_list();
                    out.push(self.send(from, SwimMessage::PushPull { members, reply: false }));
                    Vec::new()
                } else {
                    behind
                }
            }
        };
        if !behind.is_empty() {
            out.push(self.send(from, SwimMessage::Gossip { rumors: behind }));
        }
        (out, changes)
    }

    // ---- internals ----

    fn fresh_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn send(&mut self, to: &str, mut message: SwimMessage) -> Outgoing {
        // A member we suspect hears it from us first thing, whatever we send it: it
        // refutes at once, even if it was away (stopped, partitioned) while the rumor
        // spread and every copy of it has been spent.
        if let Some(k) = self.members.get(to).filter(|k| k.liveness == Liveness::Suspect) {
            let about = Rumor { member: to.to_owned(), incarnation: k.incarnation, liveness: Liveness::Suspect };
            if let SwimMessage::Ping { rumors, .. }
            | SwimMessage::PingReq { rumors, .. }
            | SwimMessage::Ack { rumors, .. }
            | SwimMessage::Gossip { rumors } = &mut message
            {
                put_first(rumors, vec![about], self.config.max_piggyback);
            }
        }
        let kind = match &message {
            SwimMessage::Ping { .. } => 0,
            SwimMessage::PingReq { .. } => 1,
            SwimMessage::Ack { .. } => 2,
            SwimMessage::PushPull { .. } => 3,
            SwimMessage::Gossip { .. } => 4,
        };
        self.sent[kind] += 1;
        Outgoing { to: to.to_owned(), message }
    }

    /// Live members, itself included.
    fn n(&self) -> usize {
        self.members.len() - self.gone + 1
    }

    /// How many times a piece of news is sent: `ceil(retransmit_mult · log10(n + 1))`.
    pub fn retransmits(&self) -> u32 {
        let n = self.n() as f64;
        (self.config.retransmit_mult * (n + 1.0).log10()).ceil().max(1.0) as u32
    }

    fn suspicion_timeout(&self) -> f64 {
        let n = (self.n() as f64).max(10.0);
        self.config.suspicion_mult * n.log10() * self.config.period * f64::from(1 + self.local_health)
    }

    /// Every member it knows (itself included), for a push-pull.
    fn full_list(&self) -> Vec<Rumor> {
        let me = Rumor { member: self.me.clone(), incarnation: self.incarnation, liveness: Liveness::Alive };
        let others = self.members.iter().map(|(m, k)| Rumor {
            member: m.clone(),
            incarnation: k.incarnation,
            liveness: k.liveness,
        });
        std::iter::once(me).chain(others).take(self.config.max_push_pull_members).collect()
    }

    /// Up to `max_piggyback` rumors, least transmitted first; each spent one transmission.
    fn piggyback(&mut self) -> Vec<Rumor> {
        let limit = self.retransmits();
        self.rumors.take(self.config.max_piggyback, limit)
    }

    fn spread(&mut self, rumor: Rumor) {
        let key = rumor.member.clone();
        self.rumors.push(&key, rumor, self.config.max_pending_rumors);
    }

    /// A message from `from` proves it alive; a member never heard of is learnt.
    fn hear_from(&mut self, from: &str, now: f64, changes: &mut Vec<Transition>) {
        if from == self.me || self.members.contains_key(from) {
            return;
        }
        // Incarnation unknown: 0, which any rumor of its real incarnation overrides.
        let rumor = Rumor { member: from.to_owned(), incarnation: 0, liveness: Liveness::Alive };
        self.apply(rumor, now, changes);
    }

    /// Applies `rumors` from one sender; returns what it is behind on (see [`Self::apply`]),
    /// one rumor per member, at most `max_piggyback`.
    fn apply_all(&mut self, rumors: Vec<Rumor>, now: f64, changes: &mut Vec<Transition>) -> Vec<Rumor> {
        let mut behind = Vec::new();
        for rumor in rumors {
            if let Some(newer) = self.apply(rumor, now, changes) {
                put_first(&mut behind, vec![newer], self.config.max_piggyback);
            }
        }
        behind
    }

    /// Applies one rumor; spreads it if it changed something.
    ///
    /// Returns what we know when the rumor would make a member less alive than it is: a
    /// suspicion or death of an older incarnation than the one we know alive or suspected,
    /// or one of ourselves that we have refuted. The sender is told at once. Otherwise it
    /// would act on its stale view (declare the member dead when its suspicion times out)
    /// until a push-pull repairs it, for the refutation's copies may all have been spent
    /// before one reached it, and those who know better ignore its stale rumor.
    fn apply(&mut self, rumor: Rumor, now: f64, changes: &mut Vec<Transition>) -> Option<Rumor> {
        let accuses = matches!(rumor.liveness, Liveness::Suspect | Liveness::Dead);
        if rumor.member == self.me {
            self.about_me(&rumor);
            return (accuses && rumor.incarnation < self.incarnation).then(|| Rumor {
                member: self.me.clone(),
                incarnation: self.incarnation,
                liveness: Liveness::Alive,
            });
        }
        let known = self.members.get(&rumor.member).map(|k| (k.incarnation, k.liveness));
        // A stranger reported dead is remembered as dead too: a stale `Alive` arriving
        // later must not resurrect it, whatever the order the rumors came in.
        let news = known.is_none_or(|known| rumor.overrides(known));
        if !news {
            return known
                .filter(|&(inc, liveness)| accuses && inc > rumor.incarnation && !liveness.is_gone())
                .map(|(incarnation, liveness)| Rumor { member: rumor.member, incarnation, liveness });
        }
        let entry = Known { incarnation: rumor.incarnation, liveness: rumor.liveness, since: now };
        self.members.insert(rumor.member.clone(), entry);
        let was_gone = known.is_some_and(|(_, l)| l.is_gone());
        match (was_gone, rumor.liveness.is_gone()) {
            (false, true) => self.gone += 1,
            (true, false) => self.gone -= 1,
            _ => {}
        }
        if rumor.liveness == Liveness::Suspect {
            self.suspects.insert(rumor.member.clone());
        } else {
            self.suspects.remove(&rumor.member);
        }
        if known.map(|(_, l)| l) != Some(rumor.liveness) {
            changes.push(Transition {
                member: rumor.member.clone(),
                liveness: rumor.liveness,
                incarnation: rumor.incarnation,
            });
        }
        self.spread(rumor);
        None
    }

    /// Suspected or declared dead at the current incarnation (or later): refute.
    fn about_me(&mut self, rumor: &Rumor) {
        if rumor.liveness == Liveness::Alive || rumor.incarnation < self.incarnation {
            return;
        }
        self.incarnation = rumor.incarnation + 1;
        // Having to refute means others find us slow: be slower to accuse them.
        self.local_health = (self.local_health + 1).min(self.config.max_local_health);
        let alive = Rumor { member: self.me.clone(), incarnation: self.incarnation, liveness: Liveness::Alive };
        self.spread(alive);
    }

    /// Ends the probe of the period: an unanswered target is suspected, and told so at
    /// once in a message of its own (Lifeguard's buddy system), so that a live member refutes
    /// without waiting for the rumor to reach it through others, which takes longer the
    /// more hops the members are apart.
    fn end_period(&mut self, now: f64, changes: &mut Vec<Transition>) -> Option<Outgoing> {
        let probe = self.probe.take()?;
        if probe.acked {
            return None;
        }
        self.local_health = (self.local_health + 1).min(self.config.max_local_health);
        let known = self.members.get(&probe.target)?;
        if known.liveness != Liveness::Alive {
            return None;
        }
        let target = probe.target;
        let rumor = Rumor { member: target.clone(), incarnation: known.incarnation, liveness: Liveness::Suspect };
        self.apply(rumor, now, changes);
        // `send` puts the suspicion first.
        Some(self.send(&target, SwimMessage::Gossip { rumors: Vec::new() }))
    }

    fn start_probe(&mut self, now: f64) -> Vec<Outgoing> {
        let Some(target) = self.next_target() else { return Vec::new() };
        let seq = self.fresh_seq();
        self.probe = Some(Probe { target: target.clone(), seq, sent_at: now, indirect_sent: false, acked: false });
        let rumors = self.piggyback();
        vec![self.send(&target, SwimMessage::Ping { seq, rumors })]
    }

    /// This period's target: in period `k` of the shared clock, the member `1 + k mod (n - 1)`
    /// places after this one in the sorted list of the `n` live members (itself included),
    /// wrapping around. The period is the one this period started in, so that a timer
    /// noticing the start late does not make two periods take the same place. A member
    /// whose local health stretches its periods is out of step anyway: it takes the next
    /// place after its last instead (a stretch that is a multiple of `n - 1` periods would
    /// otherwise probe the same member every time).
    fn next_target(&mut self) -> Option<MemberId> {
        let others: Vec<&str> = self.live_members().map(|(m, _)| m).collect();
        if others.is_empty() {
            return None;
        }
        let n = others.len() + 1;
        let slot = match self.last_slot {
            Some(last) if self.local_health > 0 => last.saturating_add(1),
            // Before the shared clock's zero (the simulation's first period) a slot counts
            // back from it; `as` saturates.
            _ => ((self.period_start + self.clock_offset) / self.config.period).floor() as i64,
        };
        let offset = 1 + slot.rem_euclid((n - 1) as i64) as usize;
        // `live_members` come sorted and never hold this member: its place among the live is
        // the count of those before it, and the target's place skips it.
        let mine = others.partition_point(|m| *m < self.me.as_str());
        let at = (mine + offset) % n;
        let target = others[if at < mine { at } else { at - 1 }].to_owned();
        self.last_slot = Some(slot);
        Some(target)
    }

    fn indirect_probe(&mut self, target: &str, seq: u64) -> Vec<Outgoing> {
        let mut helpers: Vec<MemberId> = self
            .members
            .iter()
            .filter(|(m, k)| m.as_str() != target && k.liveness == Liveness::Alive)
            .map(|(m, _)| m.clone())
            .collect();
        helpers.shuffle(&mut self.rng);
        helpers.truncate(self.config.indirect_probes);
        helpers
            .into_iter()
            .map(|helper| {
                let rumors = self.piggyback();
                self.send(&helper, SwimMessage::PingReq { seq, target: target.to_owned(), rumors })
            })
            .collect()
    }

    /// Tells each member we have suspected since an earlier period, once a period, that we
    /// do (Lifeguard's buddy system, kept up while the suspicion lasts): a member that was
    /// away while the suspicion spread (stopped, partitioned) refutes as soon as it is back
    /// and tells us at once, whatever became of its refutation's copies on the way. Without
    /// it a member that missed the refutation kept its suspicion, and then the death it
    /// declared, until a push-pull. This period's probe target hears it in the ping; at
    /// most `max_piggyback` members are told a period, in turn.
    fn remind_suspects(&mut self, now: f64) -> Vec<Outgoing> {
        let probed = self.probe.as_ref().map(|p| p.target.clone());
        let due: Vec<MemberId> = self
            .suspects
            .iter()
            .filter(|m| Some(*m) != probed.as_ref())
            .filter(|m| self.members.get(*m).is_some_and(|k| k.since < now))
            .cloned()
            .collect();
        if due.is_empty() {
            return Vec::new();
        }
        let turn = (self.periods as usize) % due.len();
        let told: Vec<MemberId> =
            due.iter().cycle().skip(turn).take(due.len().min(self.config.max_piggyback)).cloned().collect();
        told.iter().map(|m| self.send(m, SwimMessage::Gossip { rumors: Vec::new() })).collect()
    }

    fn push_pull(&mut self) -> Vec<Outgoing> {
        let live: Vec<MemberId> = self.live_members().map(|(m, _)| m.to_owned()).collect();
        let Some(to) = live.choose(&mut self.rng).cloned() else { return Vec::new() };
        let members = self.full_list();
        vec![self.send(&to, SwimMessage::PushPull { members, reply: true })]
    }

    fn expire_suspicions(&mut self, now: f64, changes: &mut Vec<Transition>) {
        if self.suspects.is_empty() {
            return;
        }
        let timeout = self.suspicion_timeout();
        let expired: Vec<(MemberId, Incarnation)> = self
            .suspects
            .iter()
            .filter_map(|m| self.members.get(m).map(|k| (m, k)))
            .filter(|(_, k)| now - k.since >= timeout)
            .map(|(m, k)| (m.clone(), k.incarnation))
            .collect();
        for (member, incarnation) in expired {
            self.apply(Rumor { member, incarnation, liveness: Liveness::Dead }, now, changes);
        }
    }

    /// Dead and left members past `gone_retention` are forgotten.
    fn forget_gone(&mut self, now: f64) {
        if self.gone == 0 {
            return;
        }
        let retention = self.config.gone_retention;
        let before = self.members.len();
        self.members.retain(|_, k| !(k.liveness.is_gone() && now - k.since > retention));
        self.gone -= before - self.members.len();
    }
}
