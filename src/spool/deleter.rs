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
//!   atomic `state` write (two fsyncs). Each of these measured 1–35 ms on this machine's disk,
//!   all of it time the loop could not serve a serial line or a command. Under
//!   `fsync = "always"` the per-append fsync stays on the loop thread: the record must be
//!   durable before `append_with` returns (and so before it is sent).
//!
//! Messages are handled in order. An error is logged here and also kept for the loop, which
//! reports it from the next [`Spool::tick`](super::Spool::tick).

use crate::spool::state::{self, State};
use std::fs::{self, File};
use std::io;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

enum Msg {
    Delete(PathBuf),
    /// `fdatasync` this (duplicated or closed) segment descriptor.
    SyncData(File, PathBuf),
    /// fsync the spool directory.
    SyncDir,
    /// Write the `state` file atomically and durably.
    State(State),
    Barrier(Sender<()>),
}

/// An error from the helper thread, kept until the loop takes it.
pub(crate) type Failed = Arc<Mutex<Option<(PathBuf, io::Error)>>>;

pub(crate) struct Deleter {
    tx: Option<Sender<Msg>>,
    handle: Option<JoinHandle<()>>,
    dir: PathBuf,
    failed: Failed,
}

struct Worker {
    dir: PathBuf,
    dir_handle: Option<File>,
    sync_dir_after_unlink: bool,
    failed: Failed,
}

impl Worker {
    fn fail(&self, path: PathBuf, e: io::Error, what: &str) {
        log::warn!("spool: {what} {}: {e}", path.display());
        if let Ok(mut f) = self.failed.lock() {
            f.get_or_insert((path, e));
        }
    }

    fn dir_handle(&mut self) -> io::Result<&File> {
        if self.dir_handle.is_none() {
            self.dir_handle = Some(File::open(&self.dir)?);
        }
        Ok(self.dir_handle.as_ref().expect("opened"))
    }

    fn sync_dir(&mut self) {
        if let Err(e) = self.dir_handle().and_then(|d| d.sync_all()) {
            self.fail(self.dir.clone(), e, "fsync of directory");
        }
    }

    fn handle(&mut self, m: Msg, unsynced: &mut bool) {
        match m {
            Msg::Delete(path) => match fs::remove_file(&path) {
                Ok(()) => *unsynced = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => log::warn!(
                    "spool: cannot delete {}: {e}; it is retried at the next start",
                    path.display()
                ),
            },
            Msg::SyncData(file, path) => {
                if let Err(e) = file.sync_data() {
                    self.fail(path, e, "fdatasync of");
                }
            }
            Msg::SyncDir => self.sync_dir(),
            Msg::State(s) => {
                let res = match self.dir_handle() {
                    Ok(_) => {
                        let d = self.dir_handle.as_ref().expect("opened");
                        state::store(&self.dir, d, &s)
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = res {
                    self.fail(self.dir.join(state::STATE_FILE), e, "writing");
                }
            }
            Msg::Barrier(done) => {
                if *unsynced && self.sync_dir_after_unlink {
                    self.sync_dir();
                    *unsynced = false;
                }
                let _ = done.send(());
            }
        }
    }
}

fn run(rx: Receiver<Msg>, mut w: Worker) {
    let mut unsynced = false;
    while let Ok(first) = rx.recv() {
        let mut msg = Some(first);
        while let Some(m) = msg.take() {
            w.handle(m, &mut unsynced);
            msg = rx.try_recv().ok();
        }
        if unsynced && w.sync_dir_after_unlink {
            w.sync_dir();
            unsynced = false;
        }
    }
}

impl Deleter {
    pub fn new(dir: PathBuf, sync_dir: bool) -> Deleter {
        let (tx, rx) = channel();
        let failed = Failed::default();
        let worker = Worker {
            dir: dir.clone(),
            dir_handle: None,
            sync_dir_after_unlink: sync_dir,
            failed: failed.clone(),
        };
        match std::thread::Builder::new()
            .name("spool-unlink".into())
            .spawn(move || run(rx, worker))
        {
            Ok(handle) => Deleter {
                tx: Some(tx),
                handle: Some(handle),
                dir,
                failed,
            },
            Err(e) => {
                log::warn!(
                    "spool: cannot start the helper thread ({e}); unlinking and syncing inline"
                );
                Deleter {
                    tx: None,
                    handle: None,
                    dir,
                    failed,
                }
            }
        }
    }

    /// Sends `m` to the thread; gives it back if the thread is not running.
    fn send(&self, m: Msg) -> Option<Msg> {
        match &self.tx {
            Some(tx) => tx.send(m).err().map(|e| e.0),
            None => Some(m),
        }
    }

    /// Queues `path` for unlinking; unlinks inline if the thread is not running.
    pub fn delete(&self, path: PathBuf) -> io::Result<()> {
        let Some(Msg::Delete(path)) = self.send(Msg::Delete(path)) else {
            return Ok(());
        };
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Queues an `fdatasync` of `file` (a duplicate of a segment's descriptor, or a closed
    /// segment); syncs inline if the thread is not running.
    pub fn sync_data(&self, file: File, path: PathBuf) -> io::Result<()> {
        match self.send(Msg::SyncData(file, path)) {
            Some(Msg::SyncData(f, _)) => f.sync_data(),
            _ => Ok(()),
        }
    }

    /// Queues an fsync of the spool directory; syncs inline if the thread is not running.
    pub fn sync_dir(&self) -> io::Result<()> {
        match self.send(Msg::SyncDir) {
            Some(_) => File::open(&self.dir).and_then(|d| d.sync_all()),
            None => Ok(()),
        }
    }

    /// Queues an atomic write of the `state` file; writes inline if the thread is not running.
    pub fn store_state(&self, s: State) -> io::Result<()> {
        match self.send(Msg::State(s)) {
            Some(Msg::State(s)) => {
                File::open(&self.dir).and_then(|d| state::store(&self.dir, &d, &s))
            }
            _ => Ok(()),
        }
    }

    /// The first error the thread met since the last call, if any.
    pub fn take_error(&self) -> Option<(PathBuf, io::Error)> {
        self.failed.lock().ok().and_then(|mut f| f.take())
    }

    /// Blocks until every queued message (and an unlink's directory fsync) is done.
    pub fn wait(&self) {
        if let Some(tx) = &self.tx {
            let (done_tx, done_rx) = channel();
            if tx.send(Msg::Barrier(done_tx)).is_ok() {
                let _ = done_rx.recv();
            }
        }
    }
}

impl Drop for Deleter {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
