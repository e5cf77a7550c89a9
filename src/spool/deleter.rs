//! The spool's helper thread (`spool-unlink`): the slow file-system work that must not run on
//! the event-loop thread.
//!
//! * Unlinks. Unlinking a multi-MiB file is not always cheap: on ext4 mounted with `discard`
//!   (and on some SD/eMMC cards) it costs several milliseconds per file, and an ack that covers
//!   many segments would stall the loop for that much times the count. So the spool forgets a
//!   segment at once (index, byte count) and hands its path to this thread, which unlinks it
//!   and then, under `fsync = "always"`, fsyncs the directory. If the process dies first, the
//!   file is found again at the next start: its records are either <= the persisted ack
//!   (deleted again) or resent.
//! * The periodic syncs of `fsync = "interval"`: the `fdatasync` of the active segment (on a
//!   duplicated descriptor), of a segment closed by a roll, of the directory, and the
//!   atomic `state` write (two fsyncs). Each of these measured 1–35 ms on a development
//!   machine's disk, all of it time the loop could not serve a serial line or a command.
//! * The syncs of `fsync = "always"` ("durable, then queued"): each append asks for an
//!   `fdatasync` of its segment (and of the directory for a new segment) with the seq it must
//!   cover. Once the syncs taken with that request have returned, the thread publishes the
//!   seq below which everything is durable ([`Deleter::durable`]) and calls the waker, so the
//!   loop queues those readings for sending. One sync covers every record written before it
//!   started (a group commit), and an `fdatasync` that takes seconds under write pressure
//!   delays only the readings it covers, never a command or a serial line.
//!
//! The work waiting for the thread is a small set, not a queue of requests: at most one
//! pending `fdatasync` per segment file (a request for a file whose sync has not started yet is
//! already covered by that sync), one directory fsync and one `state` write (the newest state
//! replaces an older one not yet written). A disk that stalls for minutes therefore holds the
//! pending work, and the descriptors it keeps open, to one per segment, however many ticks
//! come meanwhile. Unlinks are one per deleted segment, and a deletion cancels the segment's
//! pending sync.
//!
//! The thread takes all pending work at once and does it in this order: data syncs and the
//! directory fsync a new segment needs (then the durable seq is published), unlinks (they
//! free space a `state` write may need), the directory fsync after unlinks, `state`. While one operation
//! runs longer than the stall threshold the disk is reported as stalled (see
//! [`Deleter::status`]). An error is logged here and also kept for the loop, which reports it
//! from the next [`Spool::tick`](super::Spool::tick); a `state` write that failed is marked so
//! the loop writes the state again later.

use crate::spool::error::is_disk_full;
use crate::spool::state::{self, State};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// An operation of the helper that runs longer than this counts as a disk stall. Healthy
/// storage finishes an fsync in milliseconds (35 ms was the worst seen under load); an SD card
/// doing garbage collection can take a second or two.
pub(crate) const STALL_AFTER: Duration = Duration::from_secs(5);

/// Work waiting for the helper.
#[derive(Default)]
struct Work {
    /// Paths to unlink, in the order they were queued.
    deletes: Vec<PathBuf>,
    /// `fdatasync`s not started yet: at most one per segment path.
    syncs: Vec<(PathBuf, File)>,
    sync_dir: bool,
    /// The newest state to write.
    state: Option<State>,
    /// `fsync = "always"`: once the syncs above returned, every seq below this is durable.
    durable: Option<u64>,
}

impl Work {
    fn is_empty(&self) -> bool {
        self.deletes.is_empty()
            && self.syncs.is_empty()
            && !self.sync_dir
            && self.state.is_none()
            && self.durable.is_none()
    }
    fn len(&self) -> usize {
        self.deletes.len() + self.syncs.len() + usize::from(self.sync_dir) + self.state.iter().len()
    }
}

/// What the helper is doing, as the loop sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Status {
    /// The helper's current operation has run for at least the stall threshold.
    pub stalled: bool,
    /// Operations that ran for at least the stall threshold (each counted once).
    pub stalls: u64,
    /// Work items waiting (unlinks, syncs, state), not counting the one running.
    pub pending: usize,
}

struct Shared {
    work: Work,
    /// Bumped whenever work is added; `done` is the value the worker had taken when it went
    /// idle. `wait()` waits for `done` to reach the value it saw.
    queued: u64,
    done: u64,
    closing: bool,
    /// The running operation: when it started, what it is, its number.
    busy: Option<(Instant, &'static str, PathBuf)>,
    op: u64,
    stall_counted: u64,
    stalls: u64,
    stall_after: Duration,
    failed: Option<(PathBuf, io::Error)>,
    /// A `state` write failed since the loop last looked; `Some(true)` if for lack of space.
    state_failed: Option<bool>,
    /// Every seq below this is durable (`fsync = "always"`), as last published.
    durable: u64,
    /// Called after `durable` moved: wakes the loop.
    waker: Option<Box<dyn Fn() + Send>>,
}

impl Shared {
    /// Counts the running operation as a stall once it has run past the threshold.
    fn check_stall(&mut self, now: Instant) -> bool {
        let Some((since, what, path)) = &self.busy else {
            return false;
        };
        let age = now.saturating_duration_since(*since);
        if age < self.stall_after {
            return false;
        }
        if self.stall_counted != self.op {
            self.stall_counted = self.op;
            self.stalls += 1;
            log::warn!(
                "spool: disk stalled: {what} of {} has not returned after {} s \
                 (stalls={}); readings still go to the page cache",
                path.display(),
                age.as_secs(),
                self.stalls
            );
        }
        true
    }
}

struct Inner {
    shared: Mutex<Shared>,
    /// The worker waits on it for work; `wait()` waits on it for `done`.
    wake: Condvar,
    idle: Condvar,
    /// Tests set this to block the worker in the middle of an operation (a stalled disk).
    #[cfg(test)]
    hold: Arc<(Mutex<bool>, Condvar)>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // The worker never panics while holding the lock; recover the data if it did.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) struct Deleter {
    inner: Arc<Inner>,
    handle: Option<JoinHandle<()>>,
    dir: PathBuf,
}

struct Worker {
    inner: Arc<Inner>,
    dir: PathBuf,
    dir_handle: Option<File>,
    sync_dir_after_unlink: bool,
}

impl Worker {
    /// Runs one file-system operation, visible to the loop as the current one (for stall
    /// reports).
    fn op<T>(&self, what: &'static str, path: &Path, f: impl FnOnce() -> T) -> T {
        {
            let mut s = self.inner.lock();
            s.op += 1;
            s.busy = Some((Instant::now(), what, path.to_path_buf()));
        }
        #[cfg(test)]
        {
            let (held, cv) = &*self.inner.hold;
            let mut h = held.lock().unwrap_or_else(|p| p.into_inner());
            while *h {
                h = cv.wait(h).unwrap_or_else(|p| p.into_inner());
            }
        }
        let r = f();
        let mut s = self.inner.lock();
        if let Some((since, _, _)) = s.busy.take() {
            let took = since.elapsed();
            if took >= s.stall_after {
                if s.stall_counted != s.op {
                    s.stall_counted = s.op;
                    s.stalls += 1;
                }
                log::warn!(
                    "spool: disk stall over: {what} of {} took {} ms (stalls={})",
                    path.display(),
                    took.as_millis(),
                    s.stalls
                );
            }
        }
        r
    }

    fn fail(&self, path: PathBuf, e: io::Error, what: &str) {
        log::warn!("spool: {what} {}: {e}", path.display());
        self.inner.lock().failed.get_or_insert((path, e));
    }

    fn dir_handle(&mut self) -> io::Result<&File> {
        if self.dir_handle.is_none() {
            self.dir_handle = Some(File::open(&self.dir)?);
        }
        Ok(self.dir_handle.as_ref().expect("opened"))
    }

    fn sync_dir(&mut self) {
        if let Err(e) = self.dir_handle() {
            self.fail(self.dir.clone(), e, "opening directory");
            return;
        }
        let d = self.dir_handle.as_ref().expect("opened");
        if let Err(e) = self.op("fsync", &self.dir, || d.sync_all()) {
            self.fail(self.dir.clone(), e, "fsync of directory");
        }
    }

    fn write_state(&mut self, s: &State) {
        let res = match self.dir_handle() {
            Ok(_) => {
                let d = self.dir_handle.as_ref().expect("opened");
                self.op("state write", &self.dir, || state::store(&self.dir, d, s))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            let full = is_disk_full(&e);
            let mut sh = self.inner.lock();
            sh.state_failed = Some(sh.state_failed.unwrap_or(true) && full);
            drop(sh);
            if !full {
                self.fail(self.dir.join(state::STATE_FILE), e, "writing");
            }
        }
    }

    fn run(&mut self, w: Work) {
        for (path, file) in w.syncs {
            // A failed fdatasync is reported (the loop logs it from its next tick); the
            // readings it covered are still released for sending: holding them back would
            // not bring the data back, and would stop delivery for good.
            if let Err(e) = self.op("fdatasync", &path, || file.sync_data()) {
                self.fail(path, e, "fdatasync of");
            }
        }
        if w.sync_dir {
            self.sync_dir();
        }
        if let Some(upto) = w.durable {
            let mut s = self.inner.lock();
            if upto > s.durable {
                s.durable = upto;
                if let Some(wake) = &s.waker {
                    wake();
                }
            }
        }
        let mut unlinked = false;
        for path in w.deletes {
            match self.op("unlink", &path, || fs::remove_file(&path)) {
                Ok(()) => unlinked = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => log::warn!(
                    "spool: cannot delete {}: {e}; it is retried at the next start",
                    path.display()
                ),
            }
        }
        if unlinked && self.sync_dir_after_unlink {
            self.sync_dir();
        }
        if let Some(s) = w.state {
            self.write_state(&s);
        }
    }
}

fn run(mut w: Worker) {
    loop {
        let (work, gen) = {
            let mut s = w.inner.lock();
            loop {
                if !s.work.is_empty() {
                    break;
                }
                // Nothing pending (work may also have been taken by `delete_pending_now`).
                s.done = s.queued;
                w.inner.idle.notify_all();
                if s.closing {
                    return;
                }
                s = w.inner.wake.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            (std::mem::take(&mut s.work), s.queued)
        };
        w.run(work);
        let mut s = w.inner.lock();
        s.done = gen;
        w.inner.idle.notify_all();
    }
}

impl Deleter {
    pub fn new(dir: PathBuf, sync_dir: bool) -> Deleter {
        let inner = Arc::new(Inner {
            shared: Mutex::new(Shared {
                work: Work::default(),
                queued: 0,
                done: 0,
                closing: false,
                busy: None,
                op: 0,
                stall_counted: 0,
                stalls: 0,
                stall_after: STALL_AFTER,
                failed: None,
                state_failed: None,
                durable: 0,
                waker: None,
            }),
            wake: Condvar::new(),
            idle: Condvar::new(),
            #[cfg(test)]
            hold: Arc::new((Mutex::new(false), Condvar::new())),
        });
        let worker = Worker {
            inner: inner.clone(),
            dir: dir.clone(),
            dir_handle: None,
            sync_dir_after_unlink: sync_dir,
        };
        let handle = match std::thread::Builder::new()
            .name("spool-unlink".into())
            .spawn(move || run(worker))
        {
            Ok(handle) => Some(handle),
            Err(e) => {
                log::warn!(
                    "spool: cannot start the helper thread ({e}); unlinking and syncing inline"
                );
                None
            }
        };
        Deleter { inner, handle, dir }
    }

    /// Adds work for the thread (`add` edits the pending set); false if the thread is not
    /// running (the caller does the work inline).
    fn queue(&self, add: impl FnOnce(&mut Work)) -> bool {
        if self.handle.is_none() {
            return false;
        }
        let mut s = self.inner.lock();
        add(&mut s.work);
        s.queued += 1;
        self.inner.wake.notify_one();
        true
    }

    /// Queues `path` for unlinking (dropping a pending sync of it); unlinks inline if the
    /// thread is not running.
    pub fn delete(&self, path: PathBuf) -> io::Result<()> {
        let mut path = Some(path);
        if self.queue(|w| {
            let p = path.take().expect("once");
            w.syncs.retain(|(q, _)| *q != p);
            w.deletes.push(p);
        }) {
            return Ok(());
        }
        match fs::remove_file(path.expect("not queued")) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Unlinks now, on the calling thread, every unlink still waiting for the thread (not the
    /// one it may be running). For a full disk: the space of deleted segments is needed at
    /// once. Returns how many files it unlinked.
    pub fn delete_pending_now(&self) -> usize {
        let deletes = std::mem::take(&mut self.inner.lock().work.deletes);
        let mut n = 0;
        for path in deletes {
            match fs::remove_file(&path) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => log::warn!(
                    "spool: cannot delete {}: {e}; it is retried at the next start",
                    path.display()
                ),
            }
        }
        n
    }

    /// Makes sure an `fdatasync` of the segment `path` is pending. `file` gives the descriptor
    /// to sync: called with the segment's own descriptor (a closed segment) or a closure that
    /// duplicates it (the active one); the closure is not called when a sync of `path` is
    /// pending already. Syncs inline if the thread is not running. Returns true if a sync was
    /// queued or done, false if one was pending.
    pub fn sync_data(
        &self,
        path: &Path,
        file: impl FnOnce() -> io::Result<File>,
    ) -> io::Result<bool> {
        if self.handle.is_none() {
            file()?.sync_data()?;
            return Ok(true);
        }
        let mut s = self.inner.lock();
        if s.work.syncs.iter().any(|(p, _)| p == path) {
            return Ok(false);
        }
        let f = file()?;
        s.work.syncs.push((path.to_path_buf(), f));
        s.queued += 1;
        self.inner.wake.notify_one();
        Ok(true)
    }

    /// Makes sure an fsync of the spool directory is pending; syncs inline if the thread is
    /// not running. Returns false if one was pending already.
    pub fn sync_dir(&self) -> io::Result<bool> {
        let mut was = false;
        if self.queue(|w| was = std::mem::replace(&mut w.sync_dir, true)) {
            return Ok(!was);
        }
        File::open(&self.dir).and_then(|d| d.sync_all())?;
        Ok(true)
    }

    /// `fsync = "always"`: makes sure an `fdatasync` of the segment `path` (as
    /// [`Deleter::sync_data`]) and, for a new segment (`new_file`), of the directory is
    /// pending, to be followed by publishing every seq below `durable_to` as durable
    /// ([`Deleter::durable`]) and calling the waker. Returns `Some(counted)` when queued
    /// (`counted`: a new sync of `path` was queued, not one already pending), or `None` when
    /// the thread is not running and the syncs were done inline (durable now).
    pub fn sync_durable(
        &self,
        path: &Path,
        file: impl FnOnce() -> io::Result<File>,
        new_file: bool,
        durable_to: u64,
    ) -> io::Result<Option<bool>> {
        if self.handle.is_none() {
            file()?.sync_data()?;
            if new_file {
                File::open(&self.dir).and_then(|d| d.sync_all())?;
            }
            return Ok(None);
        }
        let mut s = self.inner.lock();
        // A sync of `path` not started yet covers this record too.
        let counted = !s.work.syncs.iter().any(|(p, _)| p == path);
        if counted {
            let f = file()?;
            s.work.syncs.push((path.to_path_buf(), f));
        }
        s.work.sync_dir |= new_file;
        s.work.durable = Some(s.work.durable.unwrap_or(0).max(durable_to));
        s.queued += 1;
        self.inner.wake.notify_one();
        Ok(Some(counted))
    }

    /// Every seq below this is durable, as published by the thread after the syncs of
    /// [`Deleter::sync_durable`].
    pub fn durable(&self) -> u64 {
        self.inner.lock().durable
    }

    /// Sets the function the thread calls each time [`Deleter::durable`] moves (it must be
    /// cheap and must not block: it runs on the helper thread).
    pub fn set_waker(&self, wake: Box<dyn Fn() + Send>) {
        self.inner.lock().waker = Some(wake);
    }

    /// Queues an atomic write of the `state` file (replacing one not yet written); writes
    /// inline if the thread is not running.
    pub fn store_state(&self, s: State) -> io::Result<()> {
        if self.queue(|w| w.state = Some(s)) {
            return Ok(());
        }
        File::open(&self.dir).and_then(|d| state::store(&self.dir, &d, &s))
    }

    /// The first error the thread met since the last call, if any.
    pub fn take_error(&self) -> Option<(PathBuf, io::Error)> {
        self.inner.lock().failed.take()
    }

    /// Whether a `state` write failed since the last call: `Some(true)` if every failure was
    /// for lack of space (not reported by [`Deleter::take_error`]), `Some(false)` otherwise.
    pub fn take_state_failure(&self) -> Option<bool> {
        self.inner.lock().state_failed.take()
    }

    /// The thread's state now; counts (and logs) a stall once the running operation passes the
    /// threshold.
    pub fn status(&self) -> Status {
        let mut s = self.inner.lock();
        let stalled = s.check_stall(Instant::now());
        Status {
            stalled,
            stalls: s.stalls,
            pending: s.work.len(),
        }
    }

    /// Whether the thread has work queued or running, or a result the loop has not taken
    /// yet (an error, a failed `state` write).
    pub fn busy(&self) -> bool {
        let s = self.inner.lock();
        !s.work.is_empty() || s.busy.is_some() || s.failed.is_some() || s.state_failed.is_some()
    }

    /// Changes the stall threshold (tests).
    #[cfg(test)]
    pub fn set_stall_after(&self, d: Duration) {
        self.inner.lock().stall_after = d;
    }

    /// Blocks the thread in its next operation until the guard is dropped (tests: a stalled
    /// disk).
    #[cfg(test)]
    pub fn hold(&self) -> Hold {
        *self.inner.hold.0.lock().unwrap() = true;
        Hold(self.inner.hold.clone())
    }

    /// Blocks until all work queued before the call (and an unlink's directory fsync) is done.
    pub fn wait(&self) {
        if self.handle.is_none() {
            return;
        }
        let mut s = self.inner.lock();
        let target = s.queued;
        while s.done < target {
            s = self.inner.idle.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// See [`Deleter::hold`].
#[cfg(test)]
pub(crate) struct Hold(Arc<(Mutex<bool>, Condvar)>);

#[cfg(test)]
impl Drop for Hold {
    fn drop(&mut self) {
        *self.0 .0.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.0 .1.notify_all();
    }
}

impl Drop for Deleter {
    fn drop(&mut self) {
        self.inner.lock().closing = true;
        self.inner.wake.notify_one();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
