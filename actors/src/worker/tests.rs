use proptest::prelude::*;

use super::*;

fn identity(name: &str) -> FunctionIdentity {
    FunctionIdentity {
        name: name.to_owned(),
        function_id: name.to_owned(),
        version: Version::default(),
        resources: Default::default(),
    }
}

#[test]
fn the_least_loaded_worker_with_room_takes_the_call() {
    let mut pool = WorkerPool::default();
    let f = identity("f");
    assert_eq!(pool.add(1, vec![f.clone()], 2), vec![f.clone()]);
    assert_eq!(pool.add(2, vec![f.clone()], 1), Vec::<FunctionIdentity>::new(), "already served");
    let first = pool.pick(&f, &[]);
    let second = pool.pick(&f, &[]);
    assert!(matches!((&first, &second), (Pick::Worker(a), Pick::Worker(b)) if a != b), "{first:?} {second:?}");
    // Worker 2 is full (1 of 1); worker 1 has room for one more.
    assert_eq!(pool.pick(&f, &[]), Pick::Worker(1));
    assert_eq!(pool.pick(&f, &[]), Pick::Busy);
    pool.finished(2);
    assert_eq!(pool.pick(&f, &[]), Pick::Worker(2));
    assert_eq!(pool.pick(&identity("g"), &[]), Pick::Nobody);
}

#[test]
fn a_tried_worker_is_skipped_and_the_last_one_out_orphans_its_functions() {
    let mut pool = WorkerPool::default();
    let (f, g) = (identity("f"), identity("g"));
    pool.add(1, vec![f.clone(), g.clone()], 4);
    pool.add(2, vec![f.clone()], 4);
    assert_eq!(pool.pick(&f, &[1]), Pick::Worker(2));
    assert_eq!(pool.pick(&f, &[1, 2]), Pick::Nobody);
    assert_eq!(pool.remove(1), vec![g.clone()], "g had only worker 1");
    assert!(pool.serves(&f) && !pool.serves(&g));
    assert_eq!(pool.drain(2), vec![f.clone()]);
    assert_eq!(pool.pick(&f, &[]), Pick::Nobody, "a draining worker gets no calls");
    assert_eq!(pool.remove(2), Vec::<FunctionIdentity>::new(), "already orphaned by the drain");
    assert!(pool.is_empty());
}

proptest! {
    /// Whatever the order of picks and completions, no worker exceeds its bound, and a
    /// pick fails only when every worker is at it.
    #[test]
    fn concurrency_bounds_hold(
        bounds in prop::collection::vec(1usize..4, 1..5),
        ops in prop::collection::vec(any::<(bool, u8)>(), 0..200),
    ) {
        let f = identity("f");
        let mut pool = WorkerPool::default();
        for (i, &max) in bounds.iter().enumerate() {
            pool.add(i as WorkerId, vec![f.clone()], max);
        }
        let mut running: Vec<WorkerId> = Vec::new();
        for (pick, which) in ops {
            if pick || running.is_empty() {
                match pool.pick(&f, &[]) {
                    Pick::Worker(w) => running.push(w),
                    Pick::Busy => prop_assert_eq!(running.len(), bounds.iter().sum::<usize>()),
                    Pick::Nobody => prop_assert!(false, "workers serve f"),
                }
            } else {
                let w = running.swap_remove(usize::from(which) % running.len());
                pool.finished(w);
            }
            for (i, &max) in bounds.iter().enumerate() {
                let load = running.iter().filter(|&&w| w == i as WorkerId).count();
                prop_assert!(load <= max);
                prop_assert_eq!(pool.workers[&(i as WorkerId)].in_flight, load);
            }
        }
    }
}

#[test]
fn function_names_are_escaped_in_metric_labels() {
    assert_eq!(label_value("plain"), "plain");
    assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
}

#[test]
fn secrets_compare_by_content_and_length() {
    assert!(same_secret(b"abc", b"abc"));
    assert!(!same_secret(b"abc", b"abd"));
    assert!(!same_secret(b"abc", b"abcd"));
    assert!(!same_secret(b"", b"a"));
}
