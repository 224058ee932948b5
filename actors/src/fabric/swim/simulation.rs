//! A cluster of [`Swim`] members in one process: a network that delivers each message one
//! step after it was sent and loses a fraction of them, a clock that advances in fixed
//! steps, and one seeded generator, so a run is the same every time. Used by the tests and
//! by `mpreg bench membership --simulate N`.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::{Liveness, MemberId, Outgoing, Swim, SwimConfig};

/// The simulated world.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Members at the start (named `m0`, `m1`, ...), each knowing all the others.
    pub members: usize,
    /// Fraction of messages lost, 0..1.
    pub loss: f64,
    /// Clock step and network latency, seconds.
    pub step: f64,
    /// Seed of every random choice.
    pub seed: u64,
    /// The protocol's settings.
    pub swim: SwimConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig { members: 100, loss: 0.0, step: 0.1, seed: 1, swim: SwimConfig::default() }
    }
}

/// The running simulation.
pub struct Simulation {
    config: SimConfig,
    now: f64,
    members: BTreeMap<MemberId, Swim>,
    /// Crashed: they neither tick nor receive.
    crashed: BTreeSet<MemberId>,
    in_flight: Vec<(MemberId, Outgoing)>,
    rng: StdRng,
    next_seed: u64,
}

/// How long the cluster took to learn of a join and of a failure, and what it cost.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    /// Members (before the join).
    pub members: usize,
    /// Fraction of messages lost.
    pub loss: f64,
    /// Periods until every member knew the joiner as alive.
    pub join_periods: Option<f64>,
    /// Periods from a crash until every live member suspected (or declared dead) it.
    pub failure_suspected_periods: Option<f64>,
    /// Periods from a crash until every live member declared it dead.
    pub failure_dead_periods: Option<f64>,
    /// Messages sent per member per period over the whole run.
    pub messages_per_member_per_period: f64,
    /// Running members suspected by some running member at the end (a suspicion not yet
    /// refuted: with message loss, probes fail now and then).
    pub suspected_at_end: usize,
    /// Running members some running member declared dead (must be 0).
    pub false_deaths: usize,
}

impl Simulation {
    /// `config.members` members that all know each other (a formed cluster).
    pub fn new(config: SimConfig) -> Simulation {
        let mut sim = Simulation {
            rng: StdRng::seed_from_u64(config.seed),
            next_seed: config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            config,
            now: 0.0,
            members: BTreeMap::new(),
            crashed: BTreeSet::new(),
            in_flight: Vec::new(),
        };
        let names: Vec<MemberId> = (0..sim.config.members).map(|i| format!("m{i}")).collect();
        for name in &names {
            let mut member = sim.member(name);
            let everyone: Vec<super::Rumor> = names
                .iter()
                .map(|m| super::Rumor { member: m.clone(), incarnation: 0, liveness: Liveness::Alive })
                .collect();
            // Learning them through a push-pull queues no rumors: a formed cluster is quiet.
            let _ = member.receive(name, super::SwimMessage::PushPull { members: everyone, reply: false }, 0.0);
            member.rumors.clear();
            sim.members.insert(name.clone(), member);
        }
        sim
    }

    fn member(&mut self, name: &str) -> Swim {
        self.next_seed = self.next_seed.wrapping_add(1);
        // Start each member at a random point of its period, as real nodes would.
        let start = -self.rng.gen_range(0.0..self.config.swim.period);
        Swim::new(name, self.config.swim.clone(), start, self.next_seed)
    }

    /// Seconds simulated so far.
    pub fn now(&self) -> f64 {
        self.now
    }

    /// Protocol periods simulated so far.
    pub fn periods(&self) -> f64 {
        self.now / self.config.swim.period
    }

    /// A member, if it exists.
    pub fn get(&self, name: &str) -> Option<&Swim> {
        self.members.get(name)
    }

    /// Adds member `name`, joining through `seed`.
    pub fn join(&mut self, name: &str, seed: &str) {
        let mut member = self.member(name);
        member.period_start = self.now;
        let out = member.join(seed);
        self.members.insert(name.to_owned(), member);
        self.in_flight.extend(out.into_iter().map(|o| (name.to_owned(), o)));
    }

    /// `name` stops: no more ticks, its messages are lost.
    pub fn crash(&mut self, name: &str) {
        self.crashed.insert(name.to_owned());
    }

    /// One step: deliver what was sent in the last step (minus losses), then tick all.
    pub fn step(&mut self) {
        self.now += self.config.step;
        let now = self.now;
        let mut sent = Vec::new();
        for (from, out) in std::mem::take(&mut self.in_flight) {
            if self.crashed.contains(&out.to) || self.rng.gen_bool(self.config.loss) {
                continue;
            }
            if let Some(member) = self.members.get_mut(&out.to) {
                let (replies, _) = member.receive(&from, out.message, now);
                sent.extend(replies.into_iter().map(|o| (out.to.clone(), o)));
            }
        }
        for (name, member) in &mut self.members {
            if self.crashed.contains(name) {
                continue;
            }
            let (out, _) = member.tick(now);
            sent.extend(out.into_iter().map(|o| (name.clone(), o)));
        }
        self.in_flight = sent;
    }

    /// Steps until `done` holds (checked after each step) or `max_periods` passed; the
    /// periods it took.
    pub fn run_until(&mut self, max_periods: f64, mut done: impl FnMut(&Simulation) -> bool) -> Option<f64> {
        let start = self.now;
        while (self.now - start) / self.config.swim.period < max_periods {
            self.step();
            if done(self) {
                return Some((self.now - start) / self.config.swim.period);
            }
        }
        None
    }

    /// Whether every running member other than `about` sees `about` in one of `states`.
    pub fn everyone_sees(&self, about: &str, states: &[Liveness]) -> bool {
        self.members
            .iter()
            .filter(|(name, _)| name.as_str() != about && !self.crashed.contains(*name))
            .all(|(_, m)| m.liveness_of(about).is_some_and(|l| states.contains(&l)))
    }

    /// Running members that some running member believes in one of `states`.
    pub fn wrongly_seen(&self, states: &[Liveness]) -> usize {
        let running: Vec<&str> =
            self.members.keys().filter(|n| !self.crashed.contains(*n)).map(String::as_str).collect();
        running
            .iter()
            .filter(|who| {
                running.iter().any(|viewer| {
                    viewer != *who && self.members[*viewer].liveness_of(who).is_some_and(|l| states.contains(&l))
                })
            })
            .count()
    }

    /// Messages sent by all members so far.
    pub fn messages_sent(&self) -> u64 {
        self.members
            .values()
            .map(|m| {
                let (a, b, c, d, e) = m.messages_sent();
                a + b + c + d + e
            })
            .sum()
    }

    /// The benchmark's scenario: settle, one join, then one crash; each measured until
    /// the whole cluster knows, within `max_periods`.
    pub fn join_and_failure(config: SimConfig, max_periods: f64) -> SimReport {
        let (members, loss) = (config.members, config.loss);
        let mut sim = Simulation::new(config);
        sim.run_until(2.0, |_| false);
        sim.join("joiner", "m0");
        let join_periods = sim.run_until(max_periods, |s| s.everyone_sees("joiner", &[Liveness::Alive]));
        let victim = format!("m{}", members / 2);
        sim.crash(&victim);
        let suspected = [Liveness::Suspect, Liveness::Dead];
        let failure_suspected_periods = sim.run_until(max_periods, |s| s.everyone_sees(&victim, &suspected));
        let after = failure_suspected_periods.unwrap_or(max_periods);
        let failure_dead_periods =
            sim.run_until(max_periods, |s| s.everyone_sees(&victim, &[Liveness::Dead])).map(|more| more + after);
        let total = (members + 1) as f64 * sim.periods();
        SimReport {
            members,
            loss,
            join_periods,
            failure_suspected_periods,
            failure_dead_periods,
            messages_per_member_per_period: sim.messages_sent() as f64 / total,
            suspected_at_end: sim.wrongly_seen(&[Liveness::Suspect]),
            false_deaths: sim.wrongly_seen(&[Liveness::Dead, Liveness::Left]),
        }
    }
}
