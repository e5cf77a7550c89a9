//! Unlinks segment files off the event-loop thread.
//!
//! Unlinking a multi-MiB file is not always cheap: on ext4 mounted with `discard` (and on some
//! SD/eMMC cards) it costs several milliseconds per file, and an ack that covers many segments
//! would stall the loop for that much times the count. So the spool forgets a segment at once
//! (index, byte count) and hands its path to this thread, which unlinks it and then, under
//! `fsync = "always"`, fsyncs the directory. If the process dies first, the file is found again
//! at the next start: its records are either <= the persisted ack (deleted again) or resent.

use std::fs::{self, File};
use std::io;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

enum Msg {
    Delete(PathBuf),
    Barrier(Sender<()>),
}

pub(crate) struct Deleter {
    tx: Option<Sender<Msg>>,
    handle: Option<JoinHandle<()>>,
}

fn run(rx: Receiver<Msg>, dir: PathBuf, sync_dir: bool) {
    let mut unsynced = false;
    while let Ok(first) = rx.recv() {
        let mut msg = Some(first);
        while let Some(m) = msg.take() {
            match m {
                Msg::Delete(path) => match fs::remove_file(&path) {
                    Ok(()) => unsynced = true,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => log::warn!(
                        "spool: cannot delete {}: {e}; it is retried at the next start",
                        path.display()
                    ),
                },
                Msg::Barrier(done) => {
                    if unsynced && sync_dir {
                        sync(&dir);
                        unsynced = false;
                    }
                    let _ = done.send(());
                }
            }
            msg = rx.try_recv().ok();
        }
        if unsynced && sync_dir {
            sync(&dir);
            unsynced = false;
        }
    }
}

fn sync(dir: &PathBuf) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        log::warn!("spool: fsync of directory {}: {e}", dir.display());
    }
}

impl Deleter {
    pub fn new(dir: PathBuf, sync_dir: bool) -> Deleter {
        let (tx, rx) = channel();
        match std::thread::Builder::new()
            .name("spool-unlink".into())
            .spawn(move || run(rx, dir, sync_dir))
        {
            Ok(handle) => Deleter {
                tx: Some(tx),
                handle: Some(handle),
            },
            Err(e) => {
                log::warn!("spool: cannot start the unlink thread ({e}); unlinking inline");
                Deleter {
                    tx: None,
                    handle: None,
                }
            }
        }
    }

    /// Queues `path` for unlinking; unlinks inline if the thread is not running.
    pub fn delete(&self, path: PathBuf) -> io::Result<()> {
        let path = match &self.tx {
            Some(tx) => match tx.send(Msg::Delete(path)) {
                Ok(()) => return Ok(()),
                Err(e) => match e.0 {
                    Msg::Delete(p) => p,
                    Msg::Barrier(_) => unreachable!(),
                },
            },
            None => path,
        };
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Blocks until every queued unlink (and its directory fsync) is done.
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
