//! The protocol step by step, its bounds, and simulated clusters.

use proptest::prelude::*;

use super::simulation::{SimConfig, Simulation};
use super::*;

fn config() -> SwimConfig {
    SwimConfig { push_pull_every: 0, ..SwimConfig::default() }
}

fn rumor(member: &str, incarnation: Incarnation, liveness: Liveness) -> Rumor {
    Rumor { member: member.to_owned(), incarnation, liveness }
}

/// `me`, knowing `others` as alive at incarnation 0.
fn member(me: &str, others: &[&str]) -> Swim {
    let mut swim = Swim::new(me, config(), 0.0, 7);
    let members = others.iter().map(|o| rumor(o, 0, Liveness::Alive)).collect();
    swim.receive(others.first().copied().unwrap_or("x"), SwimMessage::PushPull { members, reply: false }, 0.0);
    swim
}

fn pings(out: &[Outgoing]) -> Vec<(&str, u64)> {
    out.iter()
        .filter_map(|o| match &o.message {
            SwimMessage::Ping { seq, .. } => Some((o.to.as_str(), *seq)),
            _ => None,
        })
        .collect()
}

#[test]
fn precedence_higher_incarnation_then_left_dead_suspect_alive() {
    let known = |inc, l| (inc, l);
    assert!(rumor("b", 1, Liveness::Alive).overrides(known(0, Liveness::Suspect)));
    assert!(rumor("b", 0, Liveness::Suspect).overrides(known(0, Liveness::Alive)));
    assert!(!rumor("b", 0, Liveness::Alive).overrides(known(0, Liveness::Suspect)));
    assert!(!rumor("b", 0, Liveness::Alive).overrides(known(0, Liveness::Dead)), "no resurrection by stale gossip");
    assert!(rumor("b", 1, Liveness::Alive).overrides(known(0, Liveness::Dead)), "a restart comes back");
    assert!(rumor("b", 0, Liveness::Left).overrides(known(0, Liveness::Dead)));
    assert!(!rumor("b", 0, Liveness::Suspect).overrides(known(0, Liveness::Suspect)));
}

#[test]
fn a_suspected_member_is_told_by_whatever_it_is_sent_and_refutes() {
    let mut a = member("a", &["b", "c"]);
    a.receive("c", SwimMessage::Gossip { rumors: vec![rumor("b", 0, Liveness::Suspect)] }, 1.0);
    // Every copy of the rumor spent (b was away meanwhile).
    for seq in 0..10 {
        a.receive("c", SwimMessage::Ping { seq, rumors: vec![] }, 1.1);
    }
    let (out, _) = a.receive("b", SwimMessage::Ping { seq: 5, rumors: vec![] }, 2.0);
    let SwimMessage::Ack { rumors, .. } = &out[0].message else { panic!("{out:?}") };
    assert_eq!(rumors.first(), Some(&rumor("b", 0, Liveness::Suspect)), "{rumors:?}");
    let mut b = member("b", &["a", "c"]);
    b.receive("a", out[0].message.clone(), 2.1);
    assert_eq!(b.incarnation(), 1, "b refuted");
}

#[test]
fn a_suspect_is_reminded_every_period_and_its_answer_clears_the_suspicion() {
    // a learns that b is suspect from c's rumor while b is away (a long suspicion here, so
    // that several periods pass before a would declare it dead).
    let config = SwimConfig { suspicion_mult: 10.0, ..config() };
    let mut a = Swim::new("a", config, 0.0, 7);
    let members = ["b", "c", "d"].iter().map(|o| rumor(o, 0, Liveness::Alive)).collect();
    a.receive("c", SwimMessage::PushPull { members, reply: false }, 0.0);
    a.receive("c", SwimMessage::Gossip { rumors: vec![rumor("b", 0, Liveness::Suspect)] }, 0.5);
    // Every 50 ms for 5 s, c and d acking a's probes: what a sends b.
    let mut told = Vec::new();
    let mut now = 0.5;
    while now < 5.5 {
        now += 0.05;
        let (out, _) = a.tick(now);
        for o in out {
            match (o.to.as_str(), &o.message) {
                ("b", SwimMessage::Gossip { rumors } | SwimMessage::Ping { rumors, .. }) => {
                    assert_eq!(rumors.first(), Some(&rumor("b", 0, Liveness::Suspect)), "{rumors:?}");
                    told.push((now, o.message.clone()));
                }
                (to, SwimMessage::Ping { seq, .. }) => {
                    a.receive(to, SwimMessage::Ack { seq: *seq, rumors: vec![] }, now);
                }
                _ => {}
            }
        }
    }
    assert!(told.len() >= 4, "b is told once a period: {:?}", told.iter().map(|t| t.0).collect::<Vec<_>>());
    assert_eq!(a.liveness_of("b"), Some(Liveness::Suspect));
    // b is back: it refutes, and answers a at once with what a is behind on.
    let mut b = member("b", &["a", "c", "d"]);
    let (answer, _) = b.receive("a", told.last().expect("told").1.clone(), now);
    assert_eq!(b.incarnation(), 1);
    for o in answer.iter().filter(|o| o.to == "a") {
        a.receive("b", o.message.clone(), now);
    }
    assert_eq!(a.liveness_of("b"), Some(Liveness::Alive), "a no longer suspects b");
    let (out, _) = a.tick(now + 2.0);
    let reminded = |o: &Outgoing| matches!(&o.message, SwimMessage::Gossip { rumors } if rumors.iter().any(|r| r.member == "b" && r.liveness == Liveness::Suspect));
    assert!(!out.iter().any(reminded), "no more reminders: {out:?}");
}

#[test]
fn a_ping_is_acked_with_its_seq() {
    let mut b = member("b", &["a"]);
    let (out, _) = b.receive("a", SwimMessage::Ping { seq: 42, rumors: vec![] }, 1.0);
    assert!(matches!(&out[..], [Outgoing { to, message: SwimMessage::Ack { seq: 42, .. } }] if to == "a"));
}

#[test]
fn an_unanswered_probe_goes_indirect_then_suspects_then_declares_dead() {
    let mut a = member("a", &["b", "c", "d"]);
    let (out, _) = a.tick(1.0);
    let [(target, seq)] = pings(&out)[..] else { panic!("one ping per period: {out:?}") };
    let target = target.to_owned();
    // No ack within the probe timeout: k ping-reqs to the others, never to the target.
    let (out, _) = a.tick(1.0 + a.config.probe_timeout + 0.01);
    assert_eq!(out.len(), 2, "{out:?}");
    for o in &out {
        assert!(matches!(&o.message, SwimMessage::PingReq { seq: s, target: t, .. } if *s == seq && *t == target));
        assert_ne!(o.to, target);
    }
    // No ack by the period's end: suspected, and local health rises; the target is told
    // at once, so that it refutes if it is alive.
    let (out, changes) = a.tick(2.0);
    assert_eq!(changes, [Transition { member: target.clone(), liveness: Liveness::Suspect, incarnation: 0 }]);
    assert_eq!(a.local_health(), 1);
    let told = out.iter().find(|o| o.to == target).expect("the suspect is told");
    let SwimMessage::Gossip { rumors } = &told.message else { panic!("{told:?}") };
    assert_eq!(rumors.first(), Some(&rumor(&target, 0, Liveness::Suspect)));
    // Not refuted within the suspicion timeout: dead. (The other members answer their
    // probes, so local health, which stretches the timeout, goes back down.)
    let timeout = a.suspicion_timeout();
    let declared = declared_dead_at(&mut a, &target, 2.0, 2.0 + 2.0 * timeout);
    assert!(declared >= 2.0 + a.config.suspicion_mult * a.config.period, "not before the timeout: {declared}");
    assert_eq!(a.liveness_of(&target), Some(Liveness::Dead));
}

/// Ticks `a` every 50 ms from `from`, the other members acking its pings, until it
/// declares `target` dead (before `limit`): when it did.
fn declared_dead_at(a: &mut Swim, target: &str, from: f64, limit: f64) -> f64 {
    let dead = Transition { member: target.to_owned(), liveness: Liveness::Dead, incarnation: 0 };
    let mut now = from;
    loop {
        now += 0.05;
        assert!(now < limit, "never declared dead");
        let (out, changes) = a.tick(now);
        for (to, seq) in pings(&out) {
            if to != target {
                a.receive(to, SwimMessage::Ack { seq, rumors: vec![] }, now);
            }
        }
        if changes.contains(&dead) {
            return now;
        }
    }
}

#[test]
fn time_the_member_stalled_is_not_counted_against_the_probed_member() {
    let probed = |stall: Option<f64>| {
        let mut a = member("a", &["b"]);
        let (out, _) = a.tick(1.0);
        let [(_, seq)] = pings(&out)[..] else { panic!("{out:?}") };
        // a's loop stalls: its next timer fires at 2.6, and the ack is read after that.
        if let Some(lost) = stall {
            a.stalled(lost);
        }
        let (_, changes) = a.tick(2.6);
        a.receive("b", SwimMessage::Ack { seq, rumors: vec![] }, 2.6);
        (changes, a)
    };
    let (changes, _) = probed(None);
    assert_eq!(changes, [Transition { member: "b".into(), liveness: Liveness::Suspect, incarnation: 0 }]);
    let (changes, mut a) = probed(Some(1.5));
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(a.local_health(), 0);
    let (_, later) = a.tick(3.7);
    assert!(later.is_empty(), "{later:?}");
    assert_eq!(a.liveness_of("b"), Some(Liveness::Alive));
}

#[test]
fn a_stall_pushes_back_the_suspicion_timeout() {
    let mut a = member("a", &["b", "c"]);
    a.receive("c", SwimMessage::Gossip { rumors: vec![rumor("b", 0, Liveness::Suspect)] }, 1.0);
    let timeout = a.suspicion_timeout();
    a.stalled(2.0);
    a.stalled(f64::NAN);
    a.stalled(-1.0);
    let declared = declared_dead_at(&mut a, "b", 1.0, 1.0 + 10.0 * timeout);
    assert!(declared >= 1.0 + 2.0 + timeout, "the stall counted: {declared} (timeout {timeout})");
}

#[test]
fn an_acked_probe_suspects_nobody_and_restores_local_health() {
    let mut a = member("a", &["b"]);
    a.local_health = 2;
    let (out, _) = a.tick(3.0);
    let [(_, seq)] = pings(&out)[..] else { panic!("{out:?}") };
    a.receive("b", SwimMessage::Ack { seq, rumors: vec![] }, 3.1);
    assert_eq!(a.local_health(), 1);
    let (_, changes) = a.tick(6.0);
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(a.liveness_of("b"), Some(Liveness::Alive));
}

#[test]
fn a_ping_req_is_relayed_and_the_targets_ack_goes_back_with_the_requesters_seq() {
    let mut c = member("c", &["a", "b"]);
    let (out, _) = c.receive("a", SwimMessage::PingReq { seq: 9, target: "b".into(), rumors: vec![] }, 1.0);
    let [("b", relay_seq)] = pings(&out)[..] else { panic!("{out:?}") };
    let (out, _) = c.receive("b", SwimMessage::Ack { seq: relay_seq, rumors: vec![] }, 1.1);
    assert!(matches!(&out[..], [Outgoing { to, message: SwimMessage::Ack { seq: 9, .. } }] if to == "a"));
}

#[test]
fn a_suspected_member_refutes_with_a_higher_incarnation() {
    let mut b = member("b", &["a"]);
    let (out, _) = b.receive("a", SwimMessage::Ping { seq: 1, rumors: vec![rumor("b", 0, Liveness::Suspect)] }, 1.0);
    assert_eq!(b.incarnation(), 1);
    assert_eq!(b.local_health(), 1, "having to refute means we look slow");
    let SwimMessage::Ack { rumors, .. } = &out[0].message else { panic!("{out:?}") };
    assert!(rumors.contains(&rumor("b", 1, Liveness::Alive)), "the refutation rides on the ack: {rumors:?}");
    // And the refutation clears the suspicion elsewhere.
    let mut a = member("a", &["b"]);
    a.receive("c", SwimMessage::Ping { seq: 1, rumors: vec![rumor("b", 0, Liveness::Suspect)] }, 1.0);
    assert_eq!(a.liveness_of("b"), Some(Liveness::Suspect));
    a.receive("b", SwimMessage::Ack { seq: 99, rumors: vec![rumor("b", 1, Liveness::Alive)] }, 1.2);
    assert_eq!(a.liveness_of("b"), Some(Liveness::Alive));
}

/// The rumors of the message `out` sends to `to`, if it sends one.
fn rumors_to<'a>(out: &'a [Outgoing], to: &str) -> Option<&'a [Rumor]> {
    out.iter().find(|o| o.to == to).and_then(|o| match &o.message {
        SwimMessage::Ping { rumors, .. }
        | SwimMessage::PingReq { rumors, .. }
        | SwimMessage::Ack { rumors, .. }
        | SwimMessage::Gossip { rumors } => Some(rumors.as_slice()),
        SwimMessage::PushPull { .. } => None,
    })
}

#[test]
fn a_sender_of_a_stale_suspicion_or_death_is_told_the_refutation_at_once() {
    let mut a = member("a", &["b", "c", "m"]);
    a.receive("m", SwimMessage::Gossip { rumors: vec![rumor("m", 1, Liveness::Alive)] }, 0.5);
    for accusation in [Liveness::Suspect, Liveness::Dead] {
        // In a gossip: answered by a gossip of its own.
        let (out, changes) = a.receive("b", SwimMessage::Gossip { rumors: vec![rumor("m", 0, accusation)] }, 1.0);
        assert!(changes.is_empty(), "nothing changes here");
        assert_eq!(rumors_to(&out, "b"), Some(&[rumor("m", 1, Liveness::Alive)][..]), "{accusation:?}: {out:?}");
        // In a ping: the answer rides first on the ack.
        let (out, _) = a.receive("c", SwimMessage::Ping { seq: 3, rumors: vec![rumor("m", 0, accusation)] }, 1.0);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(rumors_to(&out, "c").and_then(|r| r.first()), Some(&rumor("m", 1, Liveness::Alive)));
    }
    assert_eq!(a.liveness_of("m"), Some(Liveness::Alive));
}

#[test]
fn a_member_accused_at_an_incarnation_it_has_refuted_answers_the_accuser() {
    let mut m = member("m", &["a", "b"]);
    // The first accusation: refuted (incarnation 1), and the accuser told directly.
    let (out, _) = m.receive("a", SwimMessage::Gossip { rumors: vec![rumor("m", 0, Liveness::Suspect)] }, 1.0);
    assert_eq!(m.incarnation(), 1);
    assert_eq!(rumors_to(&out, "a"), Some(&[rumor("m", 1, Liveness::Alive)][..]), "{out:?}");
    // A late copy of it, from another member: told too; no second refutation.
    let (out, _) = m.receive("b", SwimMessage::Gossip { rumors: vec![rumor("m", 0, Liveness::Dead)] }, 2.0);
    assert_eq!(m.incarnation(), 1);
    assert_eq!(rumors_to(&out, "b"), Some(&[rumor("m", 1, Liveness::Alive)][..]), "{out:?}");
}

#[test]
fn news_as_old_as_what_is_known_or_a_stale_alive_gets_no_answer() {
    let mut a = member("a", &["b", "m", "d"]);
    a.receive("b", SwimMessage::Gossip { rumors: vec![rumor("m", 1, Liveness::Suspect)] }, 0.5);
    a.receive("b", SwimMessage::Gossip { rumors: vec![rumor("d", 1, Liveness::Dead)] }, 0.5);
    for stale in [
        rumor("m", 1, Liveness::Suspect), // the same news
        rumor("m", 0, Liveness::Alive),   // older, but accuses nobody
        rumor("d", 0, Liveness::Suspect), // we know it dead: nothing to correct
    ] {
        let (out, _) = a.receive("b", SwimMessage::Gossip { rumors: vec![stale.clone()] }, 1.0);
        assert!(out.is_empty(), "{stale:?}: {out:?}");
    }
}

#[test]
fn messages_carry_a_bounded_number_of_rumors_each_sent_a_bounded_number_of_times() {
    // 50 members learnt at once: 50 rumors to spread.
    let mut a = Swim::new("a", config(), 0.0, 7);
    let members = (0..50).map(|i| rumor(&format!("n{i}"), 0, Liveness::Alive)).collect();
    a.receive("n0", SwimMessage::PushPull { members, reply: false }, 0.0);
    assert_eq!(a.pending_rumors(), 50);
    let limit = a.retransmits();
    let mut carried = 0;
    for seq in 0..1000 {
        let (out, _) = a.receive("n0", SwimMessage::Ping { seq, rumors: vec![] }, 2.0);
        let SwimMessage::Ack { rumors, .. } = &out[0].message else { panic!() };
        assert!(rumors.len() <= a.config.max_piggyback);
        carried += rumors.len();
    }
    assert_eq!(carried, 50 * limit as usize, "each rumor sent exactly its retransmit limit");
    assert_eq!(a.pending_rumors(), 0);
}

#[test]
fn a_leave_is_a_left_rumor_that_wins_over_alive() {
    let mut a = member("a", &["b", "c"]);
    let out = a.leave(2);
    assert_eq!(out.len(), 2);
    let mut b = member("b", &["a", "c"]);
    b.receive("a", out[0].message.clone(), 1.0);
    assert_eq!(b.liveness_of("a"), Some(Liveness::Left));
    b.receive("c", SwimMessage::Ping { seq: 1, rumors: vec![rumor("a", 0, Liveness::Alive)] }, 1.1);
    assert_eq!(b.liveness_of("a"), Some(Liveness::Left));
}

#[test]
fn every_member_is_probed_once_a_shared_period_and_probes_every_other_within_n_minus_1() {
    let names = ["a", "b", "c", "d", "e", "f", "g"];
    let n = names.len();
    // Member i's clock reads the shared clock minus `1000 - 2i`; its periods start at
    // `0.05 + 0.13i` into the shared clock's periods.
    let mut members: Vec<(f64, Swim)> = names
        .iter()
        .enumerate()
        .map(|(i, me)| {
            let behind = 1_000.0 - 2.0 * i as f64;
            let start = 0.05 + 0.13 * i as f64 - behind;
            let others: Vec<&str> = names.iter().copied().filter(|o| o != me).collect();
            let mut swim = member(me, &others).share_clock(behind);
            swim.period_start = start;
            (start, swim)
        })
        .collect();
    let mut probed_by: BTreeMap<(String, u64), BTreeSet<String>> = BTreeMap::new();
    let periods = 2 * (n - 1);
    for k in 1..=periods {
        for (start, swim) in &mut members {
            // Noticed a little late: the period still starts where the last one ended.
            let now = *start + k as f64 + 0.04;
            let (out, _) = swim.tick(now);
            let [(target, seq)] = pings(&out)[..] else { panic!("one ping a period: {out:?}") };
            let target = target.to_owned();
            swim.receive(&target, SwimMessage::Ack { seq, rumors: vec![] }, now);
            probed_by.entry((swim.me().to_owned(), k as u64)).or_default().insert(target);
        }
    }
    for k in 1..=periods as u64 {
        let targets: BTreeSet<&str> =
            probed_by.iter().filter(|((_, at), _)| *at == k).flat_map(|(_, t)| t.iter().map(String::as_str)).collect();
        assert_eq!(targets.len(), n, "period {k}: every member probed once, by one member each: {probed_by:?}");
    }
    for me in names {
        for window in 1..=(periods - n + 2) as u64 {
            let seen: BTreeSet<&str> = (window..window + n as u64 - 1)
                .flat_map(|k| probed_by[&(me.to_owned(), k)].iter().map(String::as_str))
                .collect();
            assert_eq!(seen.len(), n - 1, "{me} probes every other member in any n - 1 periods: {seen:?}");
        }
    }
}

#[test]
fn a_formed_cluster_stays_quiet_and_nobody_is_suspected_without_loss() {
    let mut sim = Simulation::new(SimConfig { members: 50, ..SimConfig::default() });
    sim.run_until(20.0, |_| false);
    assert_eq!(sim.wrongly_seen(&[Liveness::Suspect, Liveness::Dead, Liveness::Left]), 0);
    let per_member_per_period = sim.messages_sent() as f64 / (50.0 * sim.periods());
    assert!(per_member_per_period <= 2.5, "a ping and an ack each period: {per_member_per_period}");
}

#[test]
fn a_thousand_members_with_5_percent_loss_learn_a_join_and_a_failure_within_15_periods() {
    let config = SimConfig { members: 1000, loss: 0.05, seed: 11, ..SimConfig::default() };
    let report = Simulation::join_and_failure(config, 30.0);
    let join = report.join_periods.expect("the join reached everyone");
    let suspected = report.failure_suspected_periods.expect("the failure reached everyone");
    assert!(join <= 15.0, "{report:?}");
    assert!(suspected <= 15.0, "{report:?}");
    assert!(report.failure_dead_periods.is_some(), "{report:?}");
    assert_eq!(report.false_deaths, 0, "suspicions are refuted, never turned into deaths: {report:?}");
    // Constant cost per member: a probe and its ack, the odd ping-req and push-pull.
    assert!(report.messages_per_member_per_period < 4.0, "{report:?}");
}

fn liveness() -> impl Strategy<Value = Liveness> {
    prop_oneof![Just(Liveness::Alive), Just(Liveness::Suspect), Just(Liveness::Dead), Just(Liveness::Left)]
}

proptest! {
    /// Rumors about others merge like a max: any order gives the same view, and what a
    /// member ends up believing is the greatest rumor it heard.
    #[test]
    fn rumors_merge_the_same_in_any_order(
        rumors in proptest::collection::vec((0u8..4, 0u64..4, liveness()), 1..40),
        seed in any::<u64>(),
    ) {
        let rumors: Vec<Rumor> =
            rumors.into_iter().map(|(m, inc, l)| rumor(&format!("n{m}"), inc, l)).collect();
        let mut shuffled = rumors.clone();
        shuffled.shuffle(&mut StdRng::seed_from_u64(seed));
        let view = |rumors: &[Rumor]| {
            let mut a = Swim::new("a", config(), 0.0, 1);
            for r in rumors {
                a.receive("z", SwimMessage::Ping { seq: 0, rumors: vec![r.clone()] }, 1.0);
            }
            (0..4).map(|m| a.members.get(&format!("n{m}")).map(|k| (k.incarnation, k.liveness))).collect::<Vec<_>>()
        };
        let (first, second) = (view(&rumors), view(&shuffled));
        prop_assert_eq!(&first, &second);
        for (m, seen) in first.iter().enumerate() {
            let name = format!("n{m}");
            let best = rumors.iter().filter(|r| r.member == name).map(|r| (r.incarnation, r.liveness.rank())).max();
            if let (Some(best), Some((inc, l))) = (best, *seen) {
                prop_assert_eq!(best, (inc, l.rank()));
            }
        }
    }
}
