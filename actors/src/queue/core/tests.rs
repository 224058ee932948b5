//! Unit tests for every behaviour of [`QueueCore`], and property tests over random
//! operation sequences (invariants, no redelivery after an ack, recovery from the writes).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use proptest::prelude::*;

use super::*;

const T0: f64 = 1_000.0;

fn cfg() -> QueueConfig {
    QueueConfig { visibility_timeout: 10.0, max_receives: 3, quorum_wait: 5.0, ..QueueConfig::named("jobs") }
}

fn core(config: QueueConfig) -> QueueCore {
    QueueCore::new(config).expect("valid config").0
}

fn c(name: &str) -> ConsumerId {
    ConsumerId::from(name)
}

fn id(name: &str) -> MessageId {
    MessageId::from(name)
}

fn msg(name: &str, payload: &str) -> NewMessage {
    NewMessage::new(name, payload)
}

fn send(q: &mut QueueCore, m: NewMessage, now: f64) -> Step<Sent> {
    let s = q.send(m, now).unwrap();
    q.check_invariants();
    s
}

fn receive(q: &mut QueueCore, who: &str, max: usize, now: f64) -> Vec<Delivery> {
    let d = q.receive(&c(who), max, None, now).unwrap().value;
    q.check_invariants();
    d
}

fn ids_of(ds: &[Delivery]) -> Vec<&str> {
    ds.iter().map(|d| d.id.as_str()).collect()
}

impl<T: fmt::Debug> Step<Result<T>> {
    /// The step of an accepted call (panics on a refusal).
    fn unwrap(self) -> Step<T> {
        Step { value: self.value.unwrap(), writes: self.writes, pushes: self.pushes }
    }
}

impl QueueCore {
    /// Every message sits in exactly the index its state names, and the indexes hold
    /// nothing else.
    fn check_invariants(&self) {
        assert_eq!(self.ids.len(), self.messages.len());
        let dedup: u64 = self.dedup.iter().map(|(key, (_, _, first))| dedup_cost(key, first)).sum();
        assert_eq!(
            self.counted,
            self.messages.values().map(|m| cost(&m.payload)).sum::<u64>() + dedup,
            "held bytes counted exactly"
        );
        let indexed = self.delayed.len()
            + self.visible_single.len()
            + self.visible_group.len()
            + self.parked.len()
            + self.leases.len()
            + self.rounds.len()
            + self.dead.len()
            + self.dead_leases.len();
        assert_eq!(indexed, self.messages.len(), "each message in exactly one state index");
        let mut held = 0;
        for (&seq, m) in &self.messages {
            assert_eq!(self.ids.get(&m.id), Some(&seq));
            assert_eq!(m.seq, seq);
            assert!(seq < self.next_seq);
            let holds = |who: &ConsumerId| self.held.get(who).is_some_and(|s| s.contains(&seq));
            match &m.state {
                State::Delayed => assert!(self.delayed.contains(&(At(m.visible_at), seq))),
                State::Visible if m.guarantee.is_group() => assert!(self.visible_group.contains(&m.rank())),
                State::Visible => assert!(self.visible_single.contains(&m.rank())),
                State::Parked { needed } => assert!(self.parked.contains(&(*needed, m.rank()))),
                State::Leased { consumer, until } => {
                    assert!(self.leases.contains(&(At(*until), seq)));
                    assert!(holds(consumer), "a lease is held by its consumer");
                    held += 1;
                }
                State::Round { targets, until } => {
                    assert!(self.rounds.contains(&(At(*until), seq)));
                    assert!(targets.iter().all(holds));
                    assert!(targets.is_disjoint(&m.acked), "an acker is no longer a target");
                    held += targets.len();
                }
                State::Dead(_) => assert!(self.dead.contains(&seq)),
                State::DeadLeased { consumer, until, .. } => {
                    assert!(self.dead_leases.contains(&(At(*until), seq)));
                    assert!(holds(consumer), "a dead letter's lease is held by its consumer");
                    held += 1;
                }
            }
            if !matches!(m.state, State::Visible | State::Parked { .. }) {
                assert!(m.quorum_deadline.is_none(), "only a waiting quorum message has a quorum deadline");
            }
            if m.guarantee == Guarantee::FireAndForget {
                assert!(matches!(m.state, State::Delayed | State::Visible), "fire-and-forget is gone once delivered");
            }
        }
        assert_eq!(held, self.held.values().map(BTreeSet::len).sum::<usize>(), "held = leases + round copies");
        assert!(self.messages.len() <= self.config.max_messages);
        assert!(self.dedup.len() <= self.config.max_messages);
        assert_eq!(self.dedup.len(), self.dedup_order.len());
    }

    /// What the store should hold for this queue: every persisted message's record.
    fn snapshot(&self) -> BTreeMap<MessageId, StoredMessage> {
        self.messages.values().filter(|m| self.durable(m)).map(|m| (m.id.clone(), m.stored())).collect()
    }
}

/// Applies writes as the persistence actor would, to an in-memory store.
fn apply(store: &mut BTreeMap<MessageId, StoredMessage>, writes: &[QueueWrite]) {
    for w in writes {
        match w {
            QueueWrite::Upsert(m) => {
                store.insert(m.id.clone(), m.clone());
            }
            QueueWrite::Remove(id) => {
                store.remove(id);
            }
            QueueWrite::Config(_) => {}
        }
    }
}

#[test]
fn config_is_validated_and_travels_as_json() {
    assert!(QueueConfig::named("jobs-1.a_b").validate().is_ok());
    for bad in [
        QueueConfig::named(""),
        QueueConfig::named("a b"),
        QueueConfig::named("jobs.dlq"),
        QueueConfig { max_messages: 0, ..QueueConfig::named("q") },
        QueueConfig { max_message_bytes: 0, ..QueueConfig::named("q") },
        QueueConfig { max_receives: 0, ..QueueConfig::named("q") },
        QueueConfig { visibility_timeout: 0.0, ..QueueConfig::named("q") },
        QueueConfig { visibility_timeout: f64::NAN, ..QueueConfig::named("q") },
        QueueConfig { dedup_window: -1.0, ..QueueConfig::named("q") },
        QueueConfig { message_ttl: Some(0.0), ..QueueConfig::named("q") },
        QueueConfig { quorum_wait: f64::INFINITY, ..QueueConfig::named("q") },
    ] {
        assert!(matches!(bad.validate(), Err(QueueError::BadConfig(_))), "{bad:?}");
        assert!(matches!(QueueCore::new(bad), Err(QueueError::BadConfig(_))));
    }
    let json = serde_json::to_string(&cfg()).unwrap();
    assert_eq!(serde_json::from_str::<QueueConfig>(&json).unwrap(), cfg());
    let partial: QueueConfig = serde_json::from_str(r#"{"name":"q","max_receives":7}"#).unwrap();
    assert_eq!(partial, QueueConfig { max_receives: 7, ..QueueConfig::named("q") });
    assert!(serde_json::from_str::<QueueConfig>(r#"{"name":"q","max_recieves":7}"#).is_err());
}

#[test]
fn a_durable_queue_persists_its_config_and_an_in_memory_one_writes_nothing() {
    let (_, writes) = QueueCore::new(cfg()).unwrap();
    assert_eq!(writes, vec![QueueWrite::Config(cfg())]);
    let mut q = core(QueueConfig { durable: false, ..cfg() });
    assert!(send(&mut q, msg("a", "1"), T0).writes.is_empty());
    let step = q.receive(&c("x"), 1, None, T0).unwrap();
    assert!(step.writes.is_empty());
    assert!(q.ack(&c("x"), &id("a"), T0).unwrap().writes.is_empty());
}

#[test]
fn the_queues_of_a_node_hold_at_most_its_bytes_and_give_them_back() {
    // Room for three messages of 100 bytes, across two queues.
    let held = HeldBytes::new(3 * (100 + MESSAGE_OVERHEAD));
    // 100 bytes of JSON each, all different (the same content would be a duplicate).
    let payload = |n: u8| format!("\"{}{}\"", n as char, "p".repeat(97));
    let no_dedup = |name: &str| QueueConfig { dedup_window: 0.0, ..QueueConfig::named(name) };
    let (mut a, mut b) = (core(no_dedup("jobs")), core(no_dedup("other")));
    a.count_in(held.clone());
    b.count_in(held.clone());
    send(&mut a, msg("a1", &payload(b'1')), T0);
    send(&mut a, msg("a2", &payload(b'2')), T0);
    send(&mut b, msg("b1", &payload(b'3')), T0);
    let refused = b.send(msg("b2", &payload(b'4')), T0).value;
    assert_eq!(refused, Err(QueueError::NodeFull { max_bytes: 3 * (100 + MESSAGE_OVERHEAD) }));
    b.check_invariants();
    // An acknowledged message gives its bytes back, to any queue.
    receive(&mut a, "x", 1, T0);
    a.ack(&c("x"), &id("a1"), T0).unwrap();
    send(&mut b, msg("b2", &payload(b'4')), T0);
    assert_eq!(held.held(), 3 * (100 + MESSAGE_OVERHEAD));
    // A queue that goes (deleted) gives back what it held.
    drop(b);
    assert_eq!(held.held(), 100 + MESSAGE_OVERHEAD);
    // Restored messages count, even past the bound (they were accepted before).
    let stored: Vec<StoredMessage> = a.messages.values().map(|m| m.stored()).collect();
    let (mut r, _) = QueueCore::recover(no_dedup("jobs"), stored, T0).unwrap();
    r.count_in(held.clone());
    assert_eq!(held.held(), 2 * (100 + MESSAGE_OVERHEAD));
    drop((a, r));
    assert_eq!(held.held(), 0);
}

#[test]
fn dedup_records_count_in_the_nodes_bytes_until_their_window_ends() {
    let held = HeldBytes::new(1 << 20);
    let mut q = core(QueueConfig { dedup_window: 60.0, ..cfg() });
    q.count_in(held.clone());
    send(&mut q, msg("a", "1"), T0);
    receive(&mut q, "x", 1, T0);
    q.ack(&c("x"), &id("a"), T0).unwrap();
    q.check_invariants();
    // The message is gone, its dedup record is not: it still counts.
    assert!(held.held() > 0 && held.held() < MESSAGE_OVERHEAD, "{}", held.held());
    // An idle queue's timer comes due for it, a second after the window.
    assert_eq!(q.next_deadline(), Some(T0 + 61.0));
    q.tick(T0 + 61.0);
    q.check_invariants();
    assert_eq!(held.held(), 0);
    // A dedup id is a short key, not a payload.
    let long = NewMessage { dedup_id: Some("k".repeat(MAX_DEDUP_ID_BYTES + 1)), ..msg("b", "2") };
    assert!(matches!(q.send(long, T0 + 62.0).value, Err(QueueError::BadRequest(_))));
}

#[test]
fn a_lease_hides_the_message_and_an_ack_deletes_it() {
    let mut q = core(cfg());
    let s = send(&mut q, msg("a", r#"{"n":1}"#), T0);
    assert_eq!(s.value, Sent::Enqueued);
    assert!(matches!(&s.writes[..], [QueueWrite::Upsert(m)] if m.id == id("a") && m.receive_count == 0));
    let got = q.receive(&c("x"), 10, None, T0).unwrap();
    assert_eq!(ids_of(&got.value), ["a"]);
    assert_eq!(got.value[0].receive_count, 1);
    assert_eq!(got.value[0].lease_until, Some(T0 + 10.0));
    assert!(matches!(&got.writes[..], [QueueWrite::Upsert(m)] if m.receive_count == 1), "receive count persisted");
    assert_eq!(q.stats().leased, 1);
    assert!(receive(&mut q, "y", 10, T0 + 1.0).is_empty(), "a leased message is invisible");
    assert!(matches!(q.ack(&c("y"), &id("a"), T0).value, Err(QueueError::UnknownLease { .. })));
    let acked = q.ack(&c("x"), &id("a"), T0 + 2.0).unwrap();
    assert_eq!(acked.writes, vec![QueueWrite::Remove(id("a"))]);
    assert!(matches!(q.ack(&c("x"), &id("a"), T0).value, Err(QueueError::UnknownMessage(_))));
    let st = q.stats();
    assert_eq!((st.visible, st.leased, st.acked_total, st.delivered_total), (0, 0, 1, 1));
}

#[test]
fn an_expired_lease_redelivers_with_a_higher_receive_count() {
    let mut q = core(cfg());
    send(&mut q, msg("a", "1"), T0);
    receive(&mut q, "x", 1, T0);
    assert_eq!(q.next_deadline(), Some(T0 + 10.0));
    assert!(receive(&mut q, "y", 1, T0 + 9.9).is_empty());
    let tick = q.tick(T0 + 10.0);
    assert!(tick.writes.is_empty(), "visible again without a delay changes no record");
    assert_eq!(q.stats().visible, 1);
    let again = receive(&mut q, "y", 1, T0 + 10.0);
    assert_eq!(again[0].receive_count, 2);
    assert_eq!(q.stats().redelivered_total, 1);
    assert!(matches!(q.ack(&c("x"), &id("a"), T0 + 11.0).value, Err(QueueError::UnknownLease { .. })), "stale lease");
    q.ack(&c("y"), &id("a"), T0 + 11.0).unwrap();
}

#[test]
fn past_max_receives_a_message_is_dead_lettered_with_its_reason_and_can_be_redriven() {
    let mut q = core(cfg());
    send(&mut q, msg("a", "1"), T0);
    let mut now = T0;
    for n in 1..=3 {
        let d = receive(&mut q, "x", 1, now);
        assert_eq!(d[0].receive_count, n);
        now += 10.0;
        q.tick(now);
        q.check_invariants();
    }
    let st = q.stats();
    assert_eq!((st.visible, st.dead_letters, st.dead_lettered_total, st.redelivered_total), (0, 1, 1, 2));
    let dead = q.dead_letters(10);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].receive_count, 3);
    assert_eq!(dead[0].info.reason, "max receives (3) reached");
    assert!(matches!(q.ack(&c("x"), &id("a"), now).value, Err(QueueError::UnknownLease { .. })));
    let r = q.redrive(10, now);
    assert_eq!(r.value, 1);
    assert!(matches!(&r.writes[..], [QueueWrite::Upsert(m)] if m.dead.is_none() && m.receive_count == 0));
    let d = receive(&mut q, "x", 1, now);
    assert_eq!(d[0].receive_count, 1);
    assert!(q.dead_letters(10).is_empty());
}

/// Three receives without an ack at `now`, `now + 10`, `now + 20`: dead at `now + 30`.
fn kill_by_receives(q: &mut QueueCore, name: &str, now: f64) -> f64 {
    send(q, msg(name, name), now);
    let mut now = now;
    for _ in 0..3 {
        assert_eq!(ids_of(&receive(q, "x", 1, now)), [name]);
        now += 10.0;
        q.tick(now);
    }
    now
}

#[test]
fn the_dead_letter_queue_leases_dead_letters_with_their_reason_and_ack_deletes_them() {
    let mut q = core(QueueConfig { durable: true, ..cfg() });
    let now = kill_by_receives(&mut q, "a", T0);
    let now = kill_by_receives(&mut q, "b", now);
    assert_eq!(q.dead_stats().visible, 2);

    // Oldest first, one consumer at a time, with the reason.
    let got = q.receive_dead(&c("ops"), 1, Some(5.0), now).unwrap().value;
    q.check_invariants();
    assert_eq!(ids_of(&got), ["a"]);
    let info = got[0].dead.as_ref().expect("a dead letter carries its reason");
    assert_eq!(info.reason, "max receives (3) reached");
    assert_eq!(got[0].receive_count, 3);
    let other = q.receive_dead(&c("other"), 10, None, now).unwrap().value;
    assert_eq!(ids_of(&other), ["b"], "a leased dead letter is not handed to another consumer");
    let st = q.dead_stats();
    assert_eq!((st.visible, st.leased), (0, 2));
    assert_eq!(q.stats().dead_letters, 2, "still dead letters of the queue");

    // Only the holder acks; the ack deletes the record.
    assert!(matches!(q.ack_dead(&c("other"), &id("a"), now).value, Err(QueueError::UnknownLease { .. })));
    let acked = q.ack_dead(&c("ops"), &id("a"), now);
    assert!(acked.value.is_ok());
    assert_eq!(acked.writes, [QueueWrite::Remove(id("a"))]);
    q.check_invariants();

    // Redrive takes only what nobody holds; a nack gives it back at once.
    assert_eq!(q.redrive(10, now).value, 0);
    assert!(q.nack_dead(&c("other"), &id("b"), now).value.is_ok());
    q.check_invariants();
    assert_eq!(q.dead_stats().visible, 1);
    assert_eq!(q.redrive(10, now).value, 1);
    assert_eq!(ids_of(&receive(&mut q, "x", 1, now)), ["b"]);
}

#[test]
fn a_dead_letter_lease_ends_by_time_or_with_its_consumer() {
    let mut q = core(cfg());
    let now = kill_by_receives(&mut q, "a", T0);
    assert_eq!(q.receive_dead(&c("ops"), 1, Some(5.0), now).unwrap().value.len(), 1);
    assert_eq!(q.next_deadline(), Some(now + 5.0));
    q.tick(now + 5.0);
    q.check_invariants();
    assert_eq!(q.dead_stats().visible, 1, "the lease ended: available again");
    assert_eq!(q.receive_dead(&c("ops"), 1, None, now + 5.0).unwrap().value.len(), 1);
    q.consumer_gone(&c("ops"), now + 6.0);
    q.check_invariants();
    assert_eq!(q.dead_stats().visible, 1, "its consumer left: available again");
    assert_eq!(q.dead_letters(10).len(), 1);
}

#[test]
fn nack_makes_it_visible_again_at_once_or_after_a_delay() {
    let mut q = core(cfg());
    send(&mut q, msg("a", "1"), T0);
    receive(&mut q, "x", 1, T0);
    assert!(matches!(q.nack(&c("y"), &id("a"), 0.0, T0).value, Err(QueueError::UnknownLease { .. })));
    assert!(matches!(q.nack(&c("x"), &id("a"), -1.0, T0).value, Err(QueueError::BadRequest(_))));
    q.nack(&c("x"), &id("a"), 0.0, T0).unwrap();
    assert_eq!(receive(&mut q, "y", 1, T0)[0].receive_count, 2);
    let n = q.nack(&c("y"), &id("a"), 5.0, T0 + 1.0).unwrap();
    assert!(matches!(&n.writes[..], [QueueWrite::Upsert(m)] if m.visible_at == T0 + 6.0), "a delay is persisted");
    assert_eq!(q.stats().delayed, 1);
    assert_eq!(q.next_deadline(), Some(T0 + 6.0));
    assert!(receive(&mut q, "y", 1, T0 + 5.9).is_empty());
    assert_eq!(ids_of(&receive(&mut q, "y", 1, T0 + 6.0)), ["a"]);
    q.nack(&c("y"), &id("a"), 0.0, T0 + 7.0).unwrap();
    assert_eq!(q.stats().dead_letters, 1, "the third unacked receive dead-letters it");
}

#[test]
fn a_refused_call_still_carries_what_its_due_timers_did() {
    let mut q = core(QueueConfig { max_receives: 1, ..cfg() });
    send(&mut q, msg("a", "1"), T0);
    receive(&mut q, "x", 1, T0);
    // The lease ended at T0 + 10; no tick ran. The ack comes too late and is refused, but
    // the dead-lettering it triggered must still reach the store.
    let late = q.ack(&c("x"), &id("a"), T0 + 10.0);
    assert!(matches!(late.value, Err(QueueError::UnknownLease { .. })));
    assert!(matches!(&late.writes[..], [QueueWrite::Upsert(m)] if m.dead.is_some()));
    q.check_invariants();
}

#[test]
fn higher_priority_first_and_fifo_within_a_priority() {
    let mut q = core(cfg());
    for (name, p) in [("p1", 1), ("p10a", 10), ("p5", 5), ("p15", 15), ("p10b", 10), ("n", -3)] {
        send(&mut q, NewMessage { priority: p, ..msg(name, name) }, T0);
    }
    let got = receive(&mut q, "x", 100, T0);
    assert_eq!(ids_of(&got), ["p15", "p10a", "p10b", "p5", "p1", "n"]);
}

#[test]
fn a_delayed_message_is_invisible_until_its_time() {
    let mut q = core(cfg());
    send(&mut q, NewMessage { delay: 2.0, ..msg("late", "1") }, T0);
    send(&mut q, NewMessage { delay: 0.5, ..msg("soon", "2") }, T0);
    assert!(matches!(
        q.send(NewMessage { delay: f64::NAN, ..msg("bad", "3") }, T0).value,
        Err(QueueError::BadRequest(_))
    ));
    assert_eq!(q.stats().delayed, 2);
    assert_eq!(q.next_deadline(), Some(T0 + 0.5));
    assert!(receive(&mut q, "x", 10, T0 + 0.4).is_empty());
    assert_eq!(ids_of(&receive(&mut q, "x", 10, T0 + 0.5)), ["soon"]);
    assert_eq!(ids_of(&receive(&mut q, "x", 10, T0 + 2.0)), ["late"]);
}

#[test]
fn dedup_by_id_or_content_within_the_window() {
    let mut q = core(QueueConfig { dedup_window: 60.0, ..cfg() });
    send(&mut q, NewMessage { dedup_id: Some("order-7".into()), ..msg("a", "1") }, T0);
    let dup = send(&mut q, NewMessage { dedup_id: Some("order-7".into()), ..msg("b", "2") }, T0 + 1.0);
    assert_eq!(dup.value, Sent::Duplicate(id("a")));
    assert!(dup.writes.is_empty());
    send(&mut q, msg("c", r#"{"x":1}"#), T0);
    assert_eq!(send(&mut q, msg("d", r#"{"x":1}"#), T0 + 2.0).value, Sent::Duplicate(id("c")));
    assert_eq!(send(&mut q, msg("e", r#"{"x":2}"#), T0 + 2.0).value, Sent::Enqueued);
    // Still a duplicate after the first was consumed, until the window ends.
    receive(&mut q, "x", 10, T0 + 3.0);
    q.ack(&c("x"), &id("c"), T0 + 3.0).unwrap();
    assert_eq!(send(&mut q, msg("f", r#"{"x":1}"#), T0 + 59.0).value, Sent::Duplicate(id("c")));
    assert_eq!(send(&mut q, msg("g", r#"{"x":1}"#), T0 + 60.0).value, Sent::Enqueued);
    assert_eq!(q.stats().duplicates_total, 3);
    let mut off = core(QueueConfig { dedup_window: 0.0, ..cfg() });
    send(&mut off, msg("a", "1"), T0);
    assert_eq!(send(&mut off, msg("b", "1"), T0).value, Sent::Enqueued);
}

#[test]
fn a_refused_send_does_not_block_its_retry() {
    let mut q = core(QueueConfig { max_messages: 1, ..cfg() });
    send(&mut q, msg("a", "1"), T0);
    assert_eq!(q.send(msg("b", "2"), T0).value, Err(QueueError::Full { max: 1 }));
    receive(&mut q, "x", 1, T0);
    q.ack(&c("x"), &id("a"), T0).unwrap();
    assert_eq!(send(&mut q, msg("b", "2"), T0).value, Sent::Enqueued);
}

#[test]
fn each_refusal_has_its_own_error() {
    let mut q = core(QueueConfig { max_message_bytes: 8, max_messages: 2, max_receives: 1, ..cfg() });
    assert_eq!(q.send(msg("big", "\"123456789\""), T0).value, Err(QueueError::TooLarge { bytes: 11, max: 8 }));
    send(&mut q, msg("a", "1"), T0);
    assert!(matches!(q.send(msg("a", "2"), T0).value, Err(QueueError::BadRequest(_))), "id in use");
    assert!(matches!(
        q.send(NewMessage { guarantee: Guarantee::Quorum(0), ..msg("q", "3") }, T0).value,
        Err(QueueError::BadRequest(_))
    ));
    assert!(matches!(q.receive(&c("x"), 1, Some(0.0), T0).value, Err(QueueError::BadRequest(_))));
    assert!(matches!(q.ack(&c("x"), &id("nope"), T0).value, Err(QueueError::UnknownMessage(_))));
    // Dead letters count towards max_messages until purged.
    receive(&mut q, "x", 1, T0);
    q.nack(&c("x"), &id("a"), 0.0, T0).unwrap();
    send(&mut q, msg("b", "4"), T0);
    assert_eq!(q.send(msg("c", "5"), T0).value, Err(QueueError::Full { max: 2 }));
    let purged = q.purge_dead_letters(10);
    assert_eq!(purged.value, 1);
    assert_eq!(purged.writes, vec![QueueWrite::Remove(id("a"))]);
    assert_eq!(send(&mut q, msg("c", "5"), T0).value, Sent::Enqueued);
}

#[test]
fn ttl_removes_unread_messages_and_counts_them() {
    let mut q = core(QueueConfig { message_ttl: Some(30.0), ..cfg() });
    send(&mut q, msg("a", "1"), T0);
    send(&mut q, msg("b", "2"), T0 + 1.0);
    assert_eq!(q.next_deadline(), Some(T0 + 30.0));
    let t = q.tick(T0 + 30.0);
    assert_eq!(t.writes, vec![QueueWrite::Remove(id("a"))]);
    // A leased message outlives its TTL until the lease ends, then goes.
    receive(&mut q, "x", 1, T0 + 30.0);
    q.tick(T0 + 31.0);
    assert_eq!(q.stats().leased, 1);
    q.tick(T0 + 40.0);
    let st = q.stats();
    assert_eq!((st.leased, st.visible, st.expired_total), (0, 0, 2));
    assert_eq!(q.next_deadline(), Some(T0 + 301.0), "only the dedup records' sweep is left");
    q.tick(T0 + 302.0);
    assert!(q.next_deadline().is_none());
}

#[test]
fn fire_and_forget_goes_to_one_consumer_once_and_is_never_persisted() {
    let mut q = core(cfg());
    let s = send(&mut q, NewMessage { guarantee: Guarantee::FireAndForget, ..msg("f", "1") }, T0);
    assert!(s.writes.is_empty());
    let got = q.receive(&c("x"), 5, None, T0).unwrap();
    assert_eq!(ids_of(&got.value), ["f"]);
    assert_eq!(got.value[0].lease_until, None);
    assert!(got.writes.is_empty());
    assert!(receive(&mut q, "y", 5, T0 + 100.0).is_empty(), "never redelivered");
    assert!(matches!(q.ack(&c("x"), &id("f"), T0).value, Err(QueueError::UnknownMessage(_))), "nothing to ack");
    assert_eq!(q.stats().delivered_total, 1);
}

#[test]
fn receive_is_capped() {
    let mut q = core(QueueConfig { dedup_window: 0.0, ..cfg() });
    for i in 0..1200 {
        q.send(msg(&format!("m{i}"), "1"), T0).unwrap();
    }
    assert_eq!(receive(&mut q, "x", usize::MAX, T0).len(), MAX_RECEIVE_BATCH);
    assert_eq!(receive(&mut q, "x", 0, T0).len(), 0);
}

#[test]
fn subscribers_get_pushes_within_their_prefetch_round_robin() {
    let mut q = core(QueueConfig { dedup_window: 0.0, ..cfg() });
    for i in 0..5 {
        send(&mut q, msg(&format!("m{i}"), "1"), T0);
    }
    let s = q.subscribe(&c("a"), 2, T0);
    assert_eq!(ids_of(&s.pushes), ["m0", "m1"]);
    assert_eq!(s.writes.len(), 2, "each delivery persists its receive count");
    let s = q.subscribe(&c("b"), 2, T0);
    assert_eq!(ids_of(&s.pushes), ["m2", "m3"]);
    assert_eq!(q.stats().visible, 1);
    let a = q.ack(&c("a"), &id("m0"), T0).unwrap();
    assert_eq!(a.pushes.iter().map(|d| (d.consumer.as_str(), d.id.as_str())).collect::<Vec<_>>(), [("a", "m4")]);
    // New sends alternate between subscribers with credit.
    q.ack(&c("a"), &id("m1"), T0).unwrap();
    q.ack(&c("b"), &id("m2"), T0).unwrap();
    let mut to = Vec::new();
    for i in 5..7 {
        let s = send(&mut q, msg(&format!("m{i}"), "1"), T0);
        to.extend(s.pushes.into_iter().map(|d| d.consumer.to_string()));
    }
    to.sort();
    assert_eq!(to, ["a", "b"]);
    q.check_invariants();
}

#[test]
fn a_departed_consumer_releases_its_leases_at_once() {
    let mut q = core(cfg());
    send(&mut q, msg("a", "1"), T0);
    send(&mut q, msg("b", "2"), T0);
    q.subscribe(&c("sub"), 1, T0);
    receive(&mut q, "puller", 1, T0);
    assert_eq!(q.stats().leased, 2);
    let gone = q.consumer_gone(&c("puller"), T0 + 1.0);
    assert!(gone.pushes.is_empty(), "the subscriber has no credit left");
    assert_eq!(q.stats().visible, 1);
    let gone = q.consumer_gone(&c("sub"), T0 + 1.0);
    assert!(gone.pushes.is_empty());
    let st = q.stats();
    assert_eq!((st.visible, st.leased, st.subscribers, st.redelivered_total), (2, 0, 0, 2));
    q.check_invariants();
    let again = q.subscribe(&c("new"), 5, T0 + 2.0);
    assert_eq!(again.pushes.iter().map(|d| d.receive_count).collect::<Vec<_>>(), [2, 2]);
}

#[test]
fn unsubscribe_stops_pushes_but_keeps_what_is_held() {
    let mut q = core(cfg());
    q.subscribe(&c("s"), 1, T0);
    send(&mut q, msg("a", "1"), T0);
    let s = q.unsubscribe(&c("s"), T0);
    assert!(s.pushes.is_empty());
    q.check_invariants();
    assert!(send(&mut q, msg("b", "2"), T0).pushes.is_empty(), "no longer a subscriber");
    assert_eq!(q.stats().subscribers, 0);
    q.ack(&c("s"), &id("a"), T0).unwrap();
    assert_eq!(ids_of(&receive(&mut q, "s", 5, T0)), ["b"]);
}

#[test]
fn broadcast_reaches_every_present_subscriber_and_is_done_when_each_acked() {
    let mut q = core(cfg());
    send(&mut q, NewMessage { guarantee: Guarantee::Broadcast, ..msg("b", "1") }, T0);
    assert!(receive(&mut q, "puller", 5, T0).is_empty(), "pull receivers are not subscribers");
    assert_eq!(q.stats().visible, 1, "broadcast waits for a subscriber");
    q.subscribe(&c("s1"), 0, T0);
    q.check_invariants();
    let first = q.stats();
    assert_eq!((first.in_round, first.visible), (1, 0), "pushed even with no prefetch credit");
    q.ack(&c("s1"), &id("b"), T0).unwrap();
    assert_eq!(q.stats().acked_total, 1, "its only subscriber acked");

    send(&mut q, NewMessage { guarantee: Guarantee::Broadcast, ..msg("b2", "2") }, T0);
    q.consumer_gone(&c("s1"), T0);
    q.subscribe(&c("s1"), 1, T0);
    let s2 = q.subscribe(&c("s2"), 1, T0);
    assert!(s2.pushes.is_empty(), "s2 was not present at delivery");
    q.check_invariants();
    let mut q2 = core(cfg());
    q2.subscribe(&c("s1"), 1, T0);
    q2.subscribe(&c("s2"), 1, T0);
    q2.subscribe(&c("s3"), 1, T0);
    let s = send(&mut q2, NewMessage { guarantee: Guarantee::Broadcast, ..msg("b", "1") }, T0);
    let mut to: Vec<_> = s.pushes.iter().map(|d| d.consumer.to_string()).collect();
    to.sort();
    assert_eq!(to, ["s1", "s2", "s3"]);
    assert!(q2.ack(&c("s1"), &id("b"), T0).unwrap().writes.is_empty());
    assert!(q2.ack(&c("s1"), &id("b"), T0).value.is_ok(), "a repeated ack is accepted");
    q2.consumer_gone(&c("s2"), T0);
    assert_eq!(q2.stats().in_round, 1);
    let done = q2.ack(&c("s3"), &id("b"), T0).unwrap();
    assert_eq!(done.writes, vec![QueueWrite::Remove(id("b"))], "s2 left, so s1 and s3 complete it");
    q2.check_invariants();
}

#[test]
fn a_broadcast_round_that_times_out_goes_again_to_those_who_did_not_ack() {
    let mut q = core(cfg());
    q.subscribe(&c("s1"), 1, T0);
    q.subscribe(&c("s2"), 1, T0);
    send(&mut q, NewMessage { guarantee: Guarantee::Broadcast, ..msg("b", "1") }, T0);
    q.ack(&c("s1"), &id("b"), T0).unwrap();
    let t = q.tick(T0 + 10.0);
    assert_eq!(ids_of(&t.pushes), ["b"]);
    assert_eq!(t.pushes[0].consumer, c("s2"));
    assert_eq!(t.pushes[0].receive_count, 2);
    q.tick(T0 + 20.0);
    q.tick(T0 + 30.0);
    let dead = q.dead_letters(1);
    assert_eq!(dead.len(), 1, "three rounds without s2's ack");
    assert!(dead[0].info.reason.starts_with("broadcast: 1 subscribers did not ack"), "{}", dead[0].info.reason);
    q.check_invariants();
}

#[test]
fn quorum_waits_for_enough_subscribers_then_completes_after_n_acks() {
    let mut q = core(cfg());
    q.subscribe(&c("s1"), 1, T0);
    let s = send(&mut q, NewMessage { guarantee: Guarantee::Quorum(2), ..msg("q", "1") }, T0);
    assert!(s.pushes.is_empty());
    assert_eq!(q.stats().waiting_quorum, 1);
    assert_eq!(q.next_deadline(), Some(T0 + 5.0));
    q.check_invariants();
    let s = q.subscribe(&c("s2"), 1, T0 + 1.0);
    assert_eq!(s.pushes.len(), 2);
    q.subscribe(&c("s3"), 1, T0 + 1.0);
    q.ack(&c("s1"), &id("q"), T0 + 2.0).unwrap();
    assert_eq!(q.stats().in_round, 1);
    let done = q.ack(&c("s2"), &id("q"), T0 + 2.0).unwrap();
    assert_eq!(done.writes, vec![QueueWrite::Remove(id("q"))]);
    assert_eq!(q.stats().acked_total, 1);
    assert!(q.tick(T0 + 100.0).writes.is_empty(), "no quorum deadline left behind");
    q.check_invariants();
}

#[test]
fn quorum_with_too_few_subscribers_is_dead_lettered_after_the_quorum_wait() {
    let mut q = core(cfg());
    q.subscribe(&c("s1"), 1, T0);
    send(&mut q, NewMessage { guarantee: Guarantee::Quorum(3), ..msg("q", "1") }, T0);
    q.subscribe(&c("s2"), 1, T0 + 1.0);
    assert_eq!(q.stats().waiting_quorum, 1);
    let t = q.tick(T0 + 5.0);
    assert!(matches!(&t.writes[..], [QueueWrite::Upsert(m)] if m.dead.is_some()));
    let dead = q.dead_letters(5);
    assert_eq!(dead[0].info.reason, "quorum(3) not reached: 2 subscriber(s) within 5s");
    assert_eq!(dead[0].receive_count, 0);
    q.check_invariants();
}

#[test]
fn a_quorum_round_that_loses_too_many_targets_waits_again() {
    let mut q = core(cfg());
    q.subscribe(&c("s1"), 1, T0);
    q.subscribe(&c("s2"), 1, T0);
    send(&mut q, NewMessage { guarantee: Guarantee::Quorum(2), ..msg("q", "1") }, T0);
    q.ack(&c("s1"), &id("q"), T0).unwrap();
    q.consumer_gone(&c("s2"), T0 + 1.0);
    assert_eq!(q.stats().waiting_quorum, 1, "one ack kept, one more subscriber needed");
    let s = q.subscribe(&c("s3"), 1, T0 + 2.0);
    assert_eq!(s.pushes.iter().map(|d| d.consumer.as_str()).collect::<Vec<_>>(), ["s3"], "s1 already acked");
    let done = q.ack(&c("s3"), &id("q"), T0 + 2.0).unwrap();
    assert_eq!(done.writes, vec![QueueWrite::Remove(id("q"))]);
    q.check_invariants();
}

#[test]
fn recover_brings_back_pending_delayed_and_dead_and_makes_leased_visible() {
    let mut q = core(cfg());
    let mut store = BTreeMap::new();
    apply(&mut store, &send(&mut q, msg("pending", "1"), T0).writes);
    apply(&mut store, &send(&mut q, msg("leased", "2"), T0).writes);
    apply(&mut store, &send(&mut q, NewMessage { delay: 100.0, ..msg("delayed", "3") }, T0).writes);
    apply(&mut store, &send(&mut q, NewMessage { priority: 9, ..msg("dead", "4") }, T0).writes);
    apply(&mut store, &send(&mut q, NewMessage { guarantee: Guarantee::FireAndForget, ..msg("ff", "5") }, T0).writes);
    for n in 0..3 {
        let r = q.receive(&c("x"), 1, None, T0 + 10.0 * n as f64).unwrap();
        assert_eq!(ids_of(&r.value), ["dead"]);
        apply(&mut store, &r.writes);
        apply(&mut store, &q.nack(&c("x"), &id("dead"), 0.0, T0 + 10.0 * n as f64).unwrap().writes);
    }
    let r = q.receive(&c("x"), 1, None, T0 + 30.0).unwrap();
    assert_eq!(ids_of(&r.value), ["pending"]);
    apply(&mut store, &r.writes);
    apply(&mut store, &q.nack(&c("x"), &id("pending"), 0.0, T0 + 30.0).unwrap().writes);
    let r = q.receive(&c("x"), 2, None, T0 + 30.0).unwrap();
    assert_eq!(ids_of(&r.value), ["pending", "leased"]);
    apply(&mut store, &r.writes);
    apply(&mut store, &q.ack(&c("x"), &id("pending"), T0 + 30.0).unwrap().writes);
    assert_eq!(store, q.snapshot(), "the writes reproduce every record");
    assert_eq!(store.len(), 3, "leased, delayed, dead; pending acked; ff never stored");

    let stored_json = serde_json::to_string(&store.values().collect::<Vec<_>>()).unwrap();
    let mut back: Vec<StoredMessage> = serde_json::from_str(&stored_json).unwrap();
    let mut clash = back[0].clone();
    clash.id = id("same-seq-other-id");
    back.push(clash);
    back.push(back[1].clone());
    let (mut r, writes) = QueueCore::recover(cfg(), back, T0 + 31.0).unwrap();
    assert!(writes.is_empty());
    r.check_invariants();
    let st = r.stats();
    assert_eq!((st.visible, st.delayed, st.dead_letters, st.leased), (1, 1, 1, 0));
    assert_eq!(r.dead_letters(5)[0].info.reason, "max receives (3) reached");
    let got = receive(&mut r, "y", 5, T0 + 31.0);
    assert_eq!(ids_of(&got), ["leased"]);
    assert_eq!(got[0].receive_count, 2, "receive counts survive");
    r.ack(&c("y"), &id("leased"), T0 + 31.0).unwrap();
    // New messages come after the recovered ones.
    send(&mut r, msg("new", "6"), T0 + 31.0);
    assert_eq!(ids_of(&receive(&mut r, "y", 5, T0 + 200.0)), ["delayed", "new"]);
}

#[test]
fn recover_dead_letters_a_message_leased_at_its_last_receive_and_drops_expired_ones() {
    let mut q = core(QueueConfig { message_ttl: Some(50.0), ..cfg() });
    let mut store = BTreeMap::new();
    apply(&mut store, &send(&mut q, msg("poison", "1"), T0).writes);
    apply(&mut store, &send(&mut q, msg("old", "2"), T0 - 40.0).writes);
    for n in 0..3 {
        let now = T0 + f64::from(n);
        let r = q.receive(&c("x"), 1, None, now).unwrap();
        apply(&mut store, &r.writes);
        if n < 2 {
            apply(&mut store, &q.nack(&c("x"), &r.value[0].id, 0.0, now).unwrap().writes);
        }
    }
    // The node dies while "poison" is leased for the third time.
    let (r, writes) = QueueCore::recover(cfg(), store.values().cloned(), T0 + 25.0).unwrap();
    r.check_invariants();
    assert_eq!(r.stats().expired_total, 1);
    assert!(writes.contains(&QueueWrite::Remove(id("old"))));
    assert!(writes.iter().any(|w| matches!(w, QueueWrite::Upsert(m) if m.id == id("poison") && m.dead.is_some())));
    assert!(r.dead_letters(5)[0].info.reason.contains("lease lost in a restart"));
}

#[test]
fn records_travel_as_json() {
    let w = QueueWrite::Upsert(StoredMessage {
        id: id("m1"),
        payload: Payload::from(r#"{"k":[1,2]}"#),
        guarantee: Guarantee::Quorum(2),
        priority: -1,
        seq: 7,
        enqueued_at: T0,
        visible_at: T0 + 1.0,
        expires_at: None,
        receive_count: 2,
        dedup_key: Some("id:x".into()),
        dead: Some(DeadLetterInfo { reason: "why".into(), at: T0 + 2.0 }),
    });
    let text = serde_json::to_string(&w).unwrap();
    assert!(text.contains(r#""guarantee":{"quorum":2}"#), "{text}");
    assert_eq!(serde_json::from_str::<QueueWrite>(&text).unwrap(), w);
    let err = serde_json::to_string(&QueueError::Full { max: 3 }).unwrap();
    assert_eq!(serde_json::from_str::<QueueError>(&err).unwrap(), QueueError::Full { max: 3 });
}

// ---- property tests ----

#[derive(Debug, Clone)]
enum Op {
    Send {
        guarantee: u8,
        priority: i32,
        delay: u8,
        dup: Option<u8>,
    },
    Receive {
        who: u8,
        max: usize,
    },
    Ack {
        pick: usize,
        other: Option<u8>,
    },
    Nack {
        pick: usize,
        delay: u8,
    },
    Subscribe {
        who: u8,
        prefetch: usize,
    },
    Gone {
        who: u8,
    },
    Unsubscribe {
        who: u8,
    },
    /// Time passes; the actor's timer fires only if `tick` (else the next call sees it).
    Advance {
        seconds: u8,
        tick: bool,
    },
    Redrive,
    Purge,
    /// From the dead-letter queue.
    ReceiveDead {
        who: u8,
    },
    AckDead {
        pick: usize,
    },
    NackDead {
        pick: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..8, -1i32..2, 0u8..3, proptest::option::of(0u8..4))
            .prop_map(|(guarantee, priority, delay, dup)| Op::Send { guarantee, priority, delay, dup }),
        3 => (0u8..4, 0usize..4).prop_map(|(who, max)| Op::Receive { who, max }),
        4 => (any::<usize>(), proptest::option::of(0u8..4)).prop_map(|(pick, other)| Op::Ack { pick, other }),
        1 => (any::<usize>(), 0u8..3).prop_map(|(pick, delay)| Op::Nack { pick, delay }),
        1 => (0u8..4, 0usize..3).prop_map(|(who, prefetch)| Op::Subscribe { who, prefetch }),
        1 => (0u8..4).prop_map(|who| Op::Gone { who }),
        1 => (0u8..4).prop_map(|who| Op::Unsubscribe { who }),
        2 => (0u8..12, any::<bool>()).prop_map(|(seconds, tick)| Op::Advance { seconds, tick }),
        1 => Just(Op::Redrive),
        1 => Just(Op::Purge),
        1 => (0u8..4).prop_map(|who| Op::ReceiveDead { who }),
        1 => any::<usize>().prop_map(|pick| Op::AckDead { pick }),
        1 => any::<usize>().prop_map(|pick| Op::NackDead { pick }),
    ]
}

fn guarantee(g: u8) -> Guarantee {
    match g {
        0 => Guarantee::FireAndForget,
        1 => Guarantee::Broadcast,
        2 => Guarantee::Quorum(1),
        3 => Guarantee::Quorum(2),
        _ => Guarantee::AtLeastOnce,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_the_invariants_and_recover_from_the_writes(ops in proptest::collection::vec(op(), 1..80)) {
        let config = QueueConfig { max_messages: 12, dedup_window: 3.0, message_ttl: Some(40.0), ..cfg() };
        let (mut q, _) = QueueCore::new(config.clone()).unwrap();
        let mut store = BTreeMap::new();
        let mut now = T0;
        let mut next = 0u32;
        let mut delivered: Vec<(ConsumerId, MessageId)> = Vec::new();
        // (consumer, id) pairs whose ack was accepted: never delivered to them again;
        // ids completed by an ack: never delivered to anyone again.
        let mut acked_by: BTreeSet<(ConsumerId, MessageId)> = BTreeSet::new();
        let mut completed: BTreeSet<MessageId> = BTreeSet::new();
        let mut dead_delivered: Vec<(ConsumerId, MessageId)> = Vec::new();
        for op in ops {
            let mut pushes = Vec::new();
            match op {
                Op::Send { guarantee: g, priority, delay, dup } => {
                    next += 1;
                    let m = NewMessage {
                        guarantee: guarantee(g),
                        priority,
                        delay: f64::from(delay),
                        dedup_id: dup.map(|d| format!("d{d}")),
                        ..msg(&format!("m{next}"), &format!("{next}"))
                    };
                    let s = q.send(m, now);
                    apply(&mut store, &s.writes);
                    pushes = s.pushes;
                    if let Err(e) = s.value {
                        prop_assert_eq!(e, QueueError::Full { max: 12 });
                    }
                }
                Op::Receive { who, max } => {
                    let s = q.receive(&c(&format!("c{who}")), max, None, now).unwrap();
                    apply(&mut store, &s.writes);
                    pushes = s.pushes;
                    pushes.extend(s.value);
                }
                Op::Ack { pick, other } => {
                    if !delivered.is_empty() {
                        let (who, mid) = delivered[pick % delivered.len()].clone();
                        let who = other.map_or(who, |o| c(&format!("c{o}")));
                        let live_before = q.ids.contains_key(&mid);
                        let s = q.ack(&who, &mid, now);
                        apply(&mut store, &s.writes);
                        pushes = s.pushes;
                        if s.value.is_ok() {
                            acked_by.insert((who, mid.clone()));
                            if live_before && !q.ids.contains_key(&mid) {
                                completed.insert(mid);
                            }
                        }
                    }
                }
                Op::Nack { pick, delay } => {
                    if !delivered.is_empty() {
                        let (who, mid) = delivered[pick % delivered.len()].clone();
                        let s = q.nack(&who, &mid, f64::from(delay), now);
                        apply(&mut store, &s.writes);
                        pushes = s.pushes;
                    }
                }
                Op::Subscribe { who, prefetch } => {
                    let s = q.subscribe(&c(&format!("c{who}")), prefetch, now);
                    apply(&mut store, &s.writes);
                    pushes = s.pushes;
                }
                Op::Gone { who } => {
                    let s = q.consumer_gone(&c(&format!("c{who}")), now);
                    apply(&mut store, &s.writes);
                    pushes = s.pushes;
                }
                Op::Unsubscribe { who } => {
                    let s = q.unsubscribe(&c(&format!("c{who}")), now);
                    apply(&mut store, &s.writes);
                    pushes = s.pushes;
                }
                Op::Advance { seconds, tick } => {
                    now += f64::from(seconds);
                    if tick {
                        let s = q.tick(now);
                        apply(&mut store, &s.writes);
                        pushes = s.pushes;
                    }
                }
                Op::Redrive => {
                    let s = q.redrive(2, now);
                    apply(&mut store, &s.writes);
                    pushes = s.pushes;
                }
                Op::Purge => apply(&mut store, &q.purge_dead_letters(1).writes),
                Op::ReceiveDead { who } => {
                    let s = q.receive_dead(&c(&format!("c{who}")), 2, None, now).unwrap();
                    apply(&mut store, &s.writes);
                    pushes = s.pushes;
                    for d in s.value {
                        prop_assert!(d.dead.is_some(), "a dead letter comes with its reason");
                        prop_assert!(!completed.contains(&d.id), "{} received from the DLQ after it was completed", d.id);
                        dead_delivered.push((d.consumer, d.id));
                    }
                }
                Op::AckDead { pick } => {
                    if !dead_delivered.is_empty() {
                        let (who, mid) = dead_delivered[pick % dead_delivered.len()].clone();
                        let s = q.ack_dead(&who, &mid, now);
                        apply(&mut store, &s.writes);
                        pushes = s.pushes;
                        if s.value.is_ok() {
                            prop_assert!(!q.ids.contains_key(&mid), "an acked dead letter is deleted");
                            completed.insert(mid);
                        }
                    }
                }
                Op::NackDead { pick } => {
                    if !dead_delivered.is_empty() {
                        let (who, mid) = dead_delivered[pick % dead_delivered.len()].clone();
                        let s = q.nack_dead(&who, &mid, now);
                        apply(&mut store, &s.writes);
                        pushes = s.pushes;
                    }
                }
            }
            for d in pushes {
                prop_assert!(!completed.contains(&d.id), "{} delivered after it was completed", d.id);
                prop_assert!(!acked_by.contains(&(d.consumer.clone(), d.id.clone())), "redelivered to its acker");
                delivered.push((d.consumer, d.id));
            }
            q.check_invariants();
            let st = q.stats();
            prop_assert_eq!(
                st.visible + st.delayed + st.waiting_quorum + st.leased + st.in_round + st.dead_letters,
                q.messages.len()
            );
            prop_assert_eq!(&store, &q.snapshot(), "replayed writes = the live records");
        }
        // Restart: the recovered queue holds the same records, none leased.
        apply(&mut store, &q.tick(now).writes);
        let live = q.snapshot();
        let (r, writes) = QueueCore::recover(config, store.values().cloned(), now).unwrap();
        r.check_invariants();
        apply(&mut store, &writes);
        prop_assert_eq!(&store, &r.snapshot());
        // Only messages whose TTL ended while leased (the live queue drops them when the
        // lease ends) are missing.
        let expired = |rec: &StoredMessage| rec.dead.is_none() && rec.expires_at.is_some_and(|t| t <= now);
        let kept: Vec<_> = live.iter().filter(|(_, rec)| !expired(rec)).map(|(k, _)| k).collect();
        prop_assert_eq!(kept, store.keys().collect::<Vec<_>>());
        let st = r.stats();
        prop_assert_eq!((st.leased, st.in_round), (0, 0));
        for (mid, rec) in live.iter().filter(|(_, rec)| !expired(rec)) {
            let seq = r.ids[mid];
            let was = &q.messages[&q.ids[mid]].state;
            let now_state = &r.messages[&seq].state;
            let should_die = rec.receive_count >= r.config.max_receives;
            match was {
                State::Dead(_) | State::DeadLeased { .. } => prop_assert!(matches!(now_state, State::Dead(_))),
                State::Leased { .. } | State::Round { .. } if should_die => {
                    prop_assert!(matches!(now_state, State::Dead(_)))
                }
                _ => {
                    let waiting = matches!(now_state, State::Visible | State::Delayed);
                    prop_assert!(waiting, "{} is visible or delayed after a restart", mid);
                }
            }
        }
    }
}
