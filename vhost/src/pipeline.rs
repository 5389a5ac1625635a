//! Keeping a queue's requests flowing: up to [`LANES`] engine batches of
//! one virtqueue in flight at once, their used entries published in the
//! order the chains were taken.
//!
//! An engine batch completes as a whole, and a front end refills its queue
//! only as completions arrive. With one batch at a time, a queue of 32
//! drains to zero at the device before anything new arrives (fio calls this
//! batch completion; it costs about 15 % at QD32). With two lanes, a large
//! drain is split between them; the halves finish at different times, the
//! front end refills what one lane completed while the other is still at
//! the device, and the device keeps 16–32 requests in flight.
//!
//! Small drains with nothing in flight (queue depth 1) run on the queue's
//! worker thread itself, so a lone request pays no thread hand-off.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

/// Batches of one queue that may be at the engine at once.
pub const LANES: usize = 2;
/// A drain of at least this many chains is split over idle lanes.
const SPLIT_MIN: usize = 8;

/// A batch's position in publication order.
pub type Ticket = u64;

/// What a lane does with a batch: run it, then publish it with
/// [`Pipeline::publish`].
pub type Job = Box<dyn FnOnce(&Pipeline, Ticket) + Send>;

#[derive(Default)]
struct State {
    /// Batches handed out (inline or to a lane) and not yet published.
    in_flight: usize,
    /// Batches handed to lanes and not yet finished.
    lane_jobs: usize,
    next_ticket: Ticket,
    next_publish: Ticket,
}

/// The lanes of one queue.
#[derive(Default)]
pub struct Pipeline {
    state: Mutex<State>,
    changed: Condvar,
    /// The lanes' shared job queue, once started. The lane threads exit
    /// when the pipeline (and with it this sender) is dropped.
    jobs: Mutex<Option<Sender<(Job, Ticket)>>>,
}

/// How a drain is to be run.
pub enum Plan {
    /// On the calling thread, published with this ticket.
    Inline(Ticket),
    /// In parts of these sizes, each handed to a lane.
    Lanes(Vec<usize>),
}

fn relock<T>(r: std::sync::LockResult<T>) -> T {
    r.unwrap_or_else(|e| e.into_inner())
}

impl Pipeline {
    fn state(&self) -> MutexGuard<'_, State> {
        relock(self.state.lock())
    }

    /// Decides how to run a drain of `n` chains, waiting for a lane to
    /// come free when all are busy.
    pub fn plan(&self, n: usize) -> Plan {
        let mut st = self.state();
        if st.in_flight == 0 && n < SPLIT_MIN {
            st.in_flight = 1;
            st.next_ticket += 1;
            return Plan::Inline(st.next_ticket - 1);
        }
        while st.lane_jobs == LANES {
            st = relock(self.changed.wait(st));
        }
        let free = LANES - st.lane_jobs;
        let parts = if n >= SPLIT_MIN {
            free.min(n / (SPLIT_MIN / 2)).max(1)
        } else {
            1
        };
        let mut sizes = vec![n / parts; parts];
        for s in sizes.iter_mut().take(n % parts) {
            *s += 1;
        }
        Plan::Lanes(sizes)
    }

    /// Hands one part of a [`Plan::Lanes`] to a lane. If no lane thread
    /// can be started, the job runs here instead.
    pub fn dispatch(self: &Arc<Self>, job: Job) {
        let ticket = {
            let mut st = self.state();
            st.in_flight += 1;
            st.lane_jobs += 1;
            st.next_ticket += 1;
            st.next_ticket - 1
        };
        let mut jobs = relock(self.jobs.lock());
        if jobs.is_none() {
            *jobs = self.start_lanes();
        }
        let job = match jobs.as_ref() {
            Some(tx) => match tx.send((job, ticket)) {
                Ok(()) => return,
                Err(e) => e.0 .0,
            },
            None => job,
        };
        drop(jobs);
        job(self, ticket);
        self.lane_done();
    }

    fn start_lanes(self: &Arc<Self>) -> Option<Sender<(Job, Ticket)>> {
        let (tx, rx) = channel::<(Job, Ticket)>();
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for i in 0..LANES {
            let (rx, me) = (rx.clone(), Arc::downgrade(self));
            let spawned = std::thread::Builder::new()
                .name(format!("thinlun-lane{i}"))
                .spawn(move || lane(&rx, &me));
            started += usize::from(spawned.is_ok());
        }
        (started > 0).then_some(tx)
    }

    fn lane_done(&self) {
        self.state().lane_jobs -= 1;
        self.changed.notify_all();
    }

    /// Runs `publish` once every batch with an earlier ticket has been
    /// published, then lets the next one go. Used entries reach the guest
    /// in the order their chains were taken, which is what lets a
    /// restarted server resume at the used index.
    pub fn publish(&self, ticket: Ticket, publish: impl FnOnce()) {
        let mut st = self.state();
        while st.next_publish != ticket {
            st = relock(self.changed.wait(st));
        }
        publish();
        st.next_publish += 1;
        st.in_flight -= 1;
        self.changed.notify_all();
    }

    /// Waits until every batch handed out is published (the queue is
    /// being stopped: the used index it reports must be final).
    pub fn wait_idle(&self) {
        let mut st = self.state();
        while st.in_flight > 0 {
            st = relock(self.changed.wait(st));
        }
    }
}

/// A lane thread: runs jobs from the queue's shared job queue until the
/// pipeline is gone.
fn lane(rx: &Mutex<Receiver<(Job, Ticket)>>, pipeline: &Weak<Pipeline>) {
    loop {
        let next = relock(rx.lock()).recv();
        let Ok((job, ticket)) = next else { return };
        let Some(p) = pipeline.upgrade() else { return };
        job(&p, ticket);
        p.lane_done();
    }
}
