//! A fixed team of worker threads for splitting one layer's work a few microseconds
//! long: the caller publishes a job, runs its own share, and waits for the others.
//! Workers spin for a short while after a job (the next layer's job follows within
//! microseconds) and then sleep on a condition variable until the next one, so an idle
//! team costs no processor time.
//!
//! A general-purpose pool puts idle workers to sleep sooner, and waking one costs about as
//! much as a small layer takes to run; with such a pool two threads ran the default model
//! no faster than one.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_micros(500);

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// Bumped for each job; a worker runs each value once.
    epoch: AtomicUsize,
    /// The current job, valid while any worker still has to finish it.
    job: UnsafeCell<Option<*const Job>>,
    /// Workers that have not finished the current job.
    pending: AtomicUsize,
    /// Workers asleep (or about to be) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
    panicked: AtomicBool,
}

// SAFETY: `job` is written only by the caller of `run` while no worker reads it (every
// worker has finished the previous job and the new epoch is not yet published), and read by
// workers only between the epoch's publication and their `pending` decrement.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// `threads` threads: the caller of [`Team::run`] and `threads - 1` workers.
pub(crate) struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// One `run` at a time.
    busy: Mutex<()>,
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Team").field("threads", &self.threads()).finish()
    }
}

impl Team {
    /// A team of `threads` (at least 1, at most the processors this process may run on);
    /// `None` if a thread cannot be started.
    pub(crate) fn new(threads: usize) -> Option<Team> {
        let threads = threads.clamp(1, processors());
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
        });
        let mut team = Team { shared: shared.clone(), workers: Vec::new(), busy: Mutex::new(()) };
        for index in 1..threads {
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("selfclass-embed-{index}"))
                .spawn(move || work(&shared, index))
                .ok()?;
            team.workers.push(handle);
        }
        Some(team)
    }

    pub(crate) fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `job(i)` for every `i` in `0..threads()` at once, `job(0)` on the calling
    /// thread, and returns when all have finished. A panic in any of them is raised here.
    pub(crate) fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        let _busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let shared = &*self.shared;
        if !self.workers.is_empty() {
            // SAFETY: every worker finished the previous job (the last `run` waited for
            // `pending` to reach zero), so none reads `job` now; it is read only until
            // `pending` reaches zero again, which this call waits for before returning,
            // so the erased lifetime is never outlived.
            unsafe {
                let job: *const (dyn Fn(usize) + Sync + '_) = job;
                *shared.job.get() = Some(std::mem::transmute::<
                    *const (dyn Fn(usize) + Sync + '_),
                    *const Job,
                >(job));
            }
            shared.pending.store(self.workers.len(), SeqCst);
            shared.epoch.fetch_add(1, SeqCst);
            if shared.sleepers.load(SeqCst) > 0 {
                let _guard = shared.lock.lock().unwrap_or_else(|p| p.into_inner());
                shared.wake.notify_all();
            }
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job(0)));
        let mut spins = 0u32;
        while shared.pending.load(Acquire) != 0 {
            // A worker that shares this processor (fewer processors than threads) needs
            // it handed over; otherwise this spins a few microseconds.
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        let worker_panicked = shared.panicked.swap(false, SeqCst);
        if let Err(panic) = mine {
            std::panic::resume_unwind(panic);
        }
        if worker_panicked {
            panic!("an embedding worker thread panicked");
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        {
            let _guard = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// The processors this process may use, asked once: the question reads the cgroup's
/// limits from the file system, which costs tens of microseconds.
pub(crate) fn processors() -> usize {
    static PROCESSORS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PROCESSORS.get_or_init(|| std::thread::available_parallelism().map_or(1, |p| p.get()))
}

/// A worker's life: wait for each new epoch, run its share of the job, report.
fn work(shared: &Shared, index: usize) {
    let mut seen = 0;
    loop {
        let mut idle_since = None;
        let mut spins = 0u32;
        loop {
            if shared.stop.load(Acquire) {
                return;
            }
            if shared.epoch.load(Acquire) != seen {
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            // Let any other thread waiting for this processor run.
            std::thread::yield_now();
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() < SPIN {
                continue;
            }
            let guard = shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            shared.sleepers.fetch_add(1, SeqCst);
            if shared.epoch.load(SeqCst) == seen && !shared.stop.load(SeqCst) {
                drop(shared.wake.wait(guard).unwrap_or_else(|p| p.into_inner()));
            } else {
                drop(guard);
            }
            shared.sleepers.fetch_sub(1, SeqCst);
        }
        seen = shared.epoch.load(Acquire);
        // SAFETY: the job was published before the epoch this worker has just seen, and
        // stays valid until this worker decrements `pending` below.
        let job = unsafe { (*shared.job.get()).map(|job| &*job) };
        if let Some(job) = job {
            if catch_unwind(AssertUnwindSafe(|| job(index))).is_err() {
                shared.panicked.store(true, SeqCst);
            }
        }
        shared.pending.fetch_sub(1, Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_share_runs_once_per_job() {
        let team = Team::new(3).expect("team");
        let counts: Vec<AtomicUsize> = (0..team.threads()).map(|_| AtomicUsize::new(0)).collect();
        for round in 0..1000 {
            team.run(&|i| {
                counts[i].fetch_add(1, SeqCst);
            });
            assert!(counts.iter().all(|c| c.load(SeqCst) == round + 1));
            if round == 500 {
                // Long enough for the workers to fall asleep.
                std::thread::sleep(SPIN * 4);
            }
        }
    }

    #[test]
    fn a_worker_panic_reaches_the_caller_and_the_team_goes_on() {
        let team = Team::new(2).expect("team");
        if team.threads() < 2 {
            return; // One processor: there is no worker to fail.
        }
        let hit = catch_unwind(AssertUnwindSafe(|| {
            team.run(&|i| assert!(i != 1, "share {i} fails"));
        }));
        assert!(hit.is_err());
        let ran = AtomicUsize::new(0);
        team.run(&|_| {
            ran.fetch_add(1, SeqCst);
        });
        assert_eq!(ran.load(SeqCst), team.threads());
        // Every share failing at once leaves nothing behind for the next job either.
        assert!(catch_unwind(AssertUnwindSafe(|| team.run(&|i| panic!("share {i}")))).is_err());
        team.run(&|_| {});
    }

    #[test]
    fn no_more_threads_than_processors() {
        assert_eq!(Team::new(processors() + 3).expect("team").threads(), processors());
        assert_eq!(Team::new(0).expect("team").threads(), 1);
    }
}
