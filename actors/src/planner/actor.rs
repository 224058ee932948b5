//! Planner: runs large requests on its own thread, off the connection workers.
//!
//! Who sends to it: connections, with a [`RunJob`] for a request over the offload
//! threshold (many commands, a large frame) or for a run that paused in place after
//! building too much. Whom it calls: nobody directly; the job it runs calls functions,
//! peers and PubSub like any request.
//!
//! Invariants: a job is polled on this actor's arbiter (its own OS thread), never on a
//! connection's; a panic anywhere in a job answers that job (`None`, which the
//! connection turns into a 1003) and leaves the actor and the other jobs running. At
//! most [`MAX_RUNNING_JOBS`] jobs run at once (the others wait their turn), so the memory
//! the Planner's requests hold is bounded by that many request budgets.
//!
//! What a restart loses: nothing it owns. Jobs already accepted keep running on the same
//! thread (they are tasks of the arbiter, not of the actor); new jobs go to the new
//! address through the slot.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use actix::{Actor, Context, Handler, Message, ResponseFuture};
use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;
use tokio::sync::Semaphore;

use crate::protocol::ErrorCode;
use crate::supervisor::ChildGuard;

/// An encoded reply and how the request ended (for the metrics).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The reply frame's bytes.
    pub bytes: Vec<u8>,
    /// The error code, when the request failed.
    pub error: Option<ErrorCode>,
}

/// Work for the Planner's thread: builds (there) the future that answers one request.
pub type Job = Box<dyn FnOnce() -> LocalBoxFuture<'static, Answer> + Send>;

/// Run `job` on the Planner's thread. Result: the answer, or `None` if the job panicked.
#[derive(Message)]
#[rtype(result = "Option<Answer>")]
pub struct RunJob {
    /// The work.
    pub job: Job,
}

/// Jobs running at once; each may hold up to a request's budgets in memory.
pub const MAX_RUNNING_JOBS: usize = 4;

/// The supervised actor that owns the thread large requests run on.
pub struct Planner {
    running: Arc<Semaphore>,
    _guard: ChildGuard,
}

impl Planner {
    /// A planner reporting its death through `guard`.
    pub fn new(guard: ChildGuard) -> Self {
        Planner { running: Arc::new(Semaphore::new(MAX_RUNNING_JOBS)), _guard: guard }
    }
}

impl Actor for Planner {
    type Context = Context<Self>;
}

impl Handler<RunJob> for Planner {
    type Result = ResponseFuture<Option<Answer>>;

    fn handle(&mut self, msg: RunJob, _: &mut Context<Self>) -> Self::Result {
        let running = self.running.clone();
        Box::pin(async move {
            // Never closed, so a permit always comes.
            let _permit = running.acquire_owned().await.ok();
            guarded(msg.job).await
        })
    }
}

/// Runs a job, turning a panic (while building or polling its future) into `None`.
fn guarded(job: Job) -> impl Future<Output = Option<Answer>> {
    let built = catch_unwind(AssertUnwindSafe(job));
    async move {
        match built {
            Ok(future) => AssertUnwindSafe(future).catch_unwind().await.ok(),
            Err(_) => None,
        }
    }
}

crate::supervised_child!(Planner, "planner");

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(text: &str) -> Answer {
        Answer { bytes: text.as_bytes().to_vec(), error: None }
    }

    #[actix_rt::test]
    async fn jobs_run_and_panics_answer_none() {
        let ok: Job = Box::new(|| async { answer("ok") }.boxed_local());
        assert_eq!(guarded(ok).await, Some(answer("ok")));
        let panics_polled: Job = Box::new(|| async { panic!("kaboom in the future") }.boxed_local());
        assert_eq!(guarded(panics_polled).await, None);
        let panics_built: Job = Box::new(|| panic!("kaboom while building"));
        assert_eq!(guarded(panics_built).await, None);
    }
}
