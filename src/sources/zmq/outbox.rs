//! The bounded outbox and the handle the gateway queues messages through.

use super::CONTROL_RESERVE;
use crate::protocol::{reading_seq, Message, KIND_HELLO, KIND_READING};
use calloop::ping::Ping;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

/// The bounded FIFO of messages waiting for the socket.
#[derive(Debug)]
pub struct Outbox {
    queue: VecDeque<Message>,
    max: usize,
    /// Messages handed to libzmq.
    pub sent: u64,
    /// The highest reading seq handed to libzmq on the current connection (0: none).
    pub(super) highest_reading_sent: u64,
}

impl Outbox {
    /// An empty outbox that holds at most `max` readings (at least 1), plus
    /// [`CONTROL_RESERVE`] control messages.
    pub fn new(max: usize) -> Outbox {
        Outbox {
            queue: VecDeque::new(),
            max: max.max(1),
            sent: 0,
            highest_reading_sent: 0,
        }
    }
    /// Messages queued, control messages included.
    pub fn len(&self) -> usize {
        self.queue.len()
    }
    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
    /// How many more messages [`Outbox::push_back`] accepts now (0 when at `max` or beyond,
    /// in the control reserve).
    pub fn room(&self) -> usize {
        self.max - self.queue.len().min(self.max)
    }
    /// Queues at the back; gives the message back when the outbox is full.
    pub fn push_back(&mut self, m: Message) -> Result<(), Message> {
        if self.queue.len() >= self.max {
            return Err(m);
        }
        self.queue.push_back(m);
        Ok(())
    }
    /// Queues a control message (reply, stats) at the back. Control messages may use
    /// [`CONTROL_RESERVE`] places beyond `max`, so a queue full of readings never blocks a
    /// reply; gives the message back when even those are taken.
    pub fn push_control(&mut self, m: Message) -> Result<(), Message> {
        if self.queue.len() >= self.max + CONTROL_RESERVE {
            return Err(m);
        }
        self.queue.push_back(m);
        Ok(())
    }
    /// Queues a control message at the front, under the same bound as
    /// [`Outbox::push_control`]; gives the message back when the reserve is taken too.
    pub fn push_front(&mut self, m: Message) -> Result<(), Message> {
        if self.queue.len() >= self.max + CONTROL_RESERVE {
            return Err(m);
        }
        self.queue.push_front(m);
        Ok(())
    }
    /// Queues a `hello` at the front (on each connect), first removing any `hello` still
    /// queued: only the newest describes the gateway's state (its `resume_seq` in particular),
    /// and a link that connects again and again must not pile them up. Bounded like
    /// [`Outbox::push_front`].
    pub fn push_hello(&mut self, m: Message) -> Result<(), Message> {
        self.queue.retain(|q| q.kind != KIND_HELLO);
        self.push_front(m)
    }
    /// Keeps only the messages for which `keep` is true.
    pub fn retain(&mut self, keep: impl FnMut(&Message) -> bool) {
        self.queue.retain(keep);
    }
    /// The queued messages, oldest (next to send) first.
    pub fn iter(&self) -> impl Iterator<Item = &Message> {
        self.queue.iter()
    }
    pub(super) fn front(&self) -> Option<&Message> {
        self.queue.front()
    }
    pub(super) fn pop_front(&mut self) {
        if let Some(m) = self.queue.pop_front() {
            self.note_sent(&m);
        }
    }
    /// Counts a message handed to libzmq, and a reading's seq.
    fn note_sent(&mut self, m: &Message) {
        self.sent += 1;
        if m.kind == KIND_READING {
            if let Some(seq) = reading_seq(&m.body) {
                self.highest_reading_sent = self.highest_reading_sent.max(seq);
            }
        }
    }
}

/// The handle the rest of the gateway uses to queue messages. Cheap to clone.
#[derive(Clone)]
pub struct OutboxHandle {
    pub(super) outbox: Rc<RefCell<Outbox>>,
    pub(super) socket: Rc<zmq::Socket>,
    pub(super) connected: Rc<Cell<bool>>,
    pub(super) direct: Rc<Cell<bool>>,
    /// The last push went straight to libzmq and the ZMQ_EVENTS read after it showed no
    /// input; nothing was queued since. [`OutboxHandle::end_of_wake`] then re-opens the
    /// direct path for the next wake.
    pub(super) settled: Rc<Cell<bool>>,
    pub(super) ping: Ping,
    pub(super) close_linger_ms: Rc<Cell<i32>>,
    pub(super) check_requested: Rc<Cell<bool>>,
    pub(super) reconnect_requested: Rc<Cell<bool>>,
}

impl OutboxHandle {
    /// Asks the source to drop the current connection and dial the endpoint again on its
    /// next dispatch (a connection on which the backend is not heard). The source reports
    /// [`super::ZmqEvent::Disconnected`] at once, sends nothing until the new connection is
    /// reported, and the outbox keeps its messages.
    pub fn request_reconnect(&self) {
        self.reconnect_requested.set(true);
        self.ping.ping();
    }

    /// The highest reading seq handed to libzmq on the current connection (0: none yet).
    pub fn highest_reading_sent(&self) -> u64 {
        self.outbox.borrow().highest_reading_sent
    }

    /// Asks the source to check the connection on its next dispatch. Call it from a timer
    /// while no connection is reported (after `Disconnected`, and from the start):
    /// * reconnects if libzmq gave up on the connection: after a protocol error (e.g. a frame
    ///   over ZMQ_MAXMSGSIZE, or a corrupt CURVE frame) libzmq closes the connection and
    ///   never retries it;
    /// * reports `Connected` if the connection is up although the monitor never said so.
    ///   libzmq occasionally loses a monitor event (seen in processes that create many
    ///   contexts); without this a gateway that missed its HANDSHAKE_SUCCEEDED would hold its
    ///   readings forever. With ZMQ_IMMEDIATE (the gateway sets it) the socket is writable
    ///   only through a completed connection, so writability is the evidence.
    pub fn request_connection_check(&self) {
        self.check_requested.set(true);
        self.ping.ping();
    }

    /// Whether the backend connection is up (a handshake was reported, or found by
    /// [`OutboxHandle::request_connection_check`]).
    pub fn is_connected(&self) -> bool {
        self.connected.get()
    }

    /// Sends a message, or queues it and wakes the source; gives it back when the outbox is
    /// full.
    ///
    /// When nothing is queued and the connection is up, the message goes to libzmq at once
    /// (`DONTWAIT`): no wake of the source, no extra turn of the loop (docs/benchmarks.md,
    /// item 2). Once per pump cycle: the next pushes queue until the source has run again, so
    /// a burst (many lines in one read) costs one ZMQ_EVENTS check and goes out in the
    /// source's batched rounds. A send can make libzmq process its command mailbox and so consume the ZMQ_FD
    /// edge of a message that arrived meanwhile; if ZMQ_EVENTS then shows input, the source is
    /// pinged to read it. Otherwise (EAGAIN, not connected, older messages queued) the message
    /// is queued. Only a push into an empty outbox pings (one eventfd write per burst): a
    /// non-empty outbox is already known to the source, which either has a ping pending
    /// (budget spent) or is waiting for the socket to become writable, which ZMQ_FD reports.
    pub fn push(&self, m: Message) -> Result<(), Message> {
        let mut outbox = self.outbox.borrow_mut();
        if outbox.is_empty() && self.connected.get() && self.direct.replace(false) {
            let [kind, body] = m.frames();
            if self.socket.send(kind, zmq::DONTWAIT | zmq::SNDMORE).is_ok() {
                // Multipart messages are atomic: the last frame of an accepted first frame
                // is accepted too.
                if let Err(e) = self.socket.send(body, zmq::DONTWAIT) {
                    log::error!("zmq send of a message's last frame failed: {e}");
                }
                outbox.note_sent(&m);
                drop(outbox);
                match self.socket.get_events() {
                    Ok(ev) if !ev.contains(zmq::POLLIN) => self.settled.set(true),
                    _ => self.ping.ping(),
                }
                return Ok(());
            }
        }
        self.settled.set(false);
        let was_empty = outbox.is_empty();
        outbox.push_back(m)?;
        drop(outbox);
        if was_empty {
            self.ping.ping();
        }
        Ok(())
    }

    /// Call once the loop has dispatched every source of a wake (e.g. from the callback of
    /// `EventLoop::run`). If this wake's last push went straight to libzmq and found no
    /// input, and nothing was queued since, the socket's state is still known (the ZMQ_EVENTS
    /// read after that send processed libzmq's mailbox, so any later change fires ZMQ_FD):
    /// the next push, in a later wake, may go straight to libzmq again. Without this the
    /// direct path opens only after the source's pump has run, so at a steady rate every
    /// other reading would be queued and cost a ping and an extra turn of the loop. Within a
    /// wake the path stays closed after one direct send: a burst of lines goes out in the
    /// pump's batched rounds with one ZMQ_EVENTS read per round, not one per line.
    pub fn end_of_wake(&self) {
        if self.settled.replace(false) && self.outbox.borrow().is_empty() {
            self.direct.set(true);
        }
    }
    /// Runs `f` on the outbox (to push several messages, inspect, reorder), then wakes the
    /// source.
    pub fn with<R>(&self, f: impl FnOnce(&mut Outbox) -> R) -> R {
        self.settled.set(false);
        let r = f(&mut self.outbox.borrow_mut());
        self.ping.ping();
        r
    }
    /// Runs `f` on the outbox without waking the source.
    pub fn peek<R>(&self, f: impl FnOnce(&Outbox) -> R) -> R {
        f(&self.outbox.borrow())
    }
    /// Messages queued (see [`Outbox::len`]).
    pub fn len(&self) -> usize {
        self.outbox.borrow().len()
    }
    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.outbox.borrow().is_empty()
    }
    /// How many more readings the outbox accepts now (see [`Outbox::room`]).
    pub fn room(&self) -> usize {
        self.outbox.borrow().room()
    }
    /// Messages handed to libzmq since the source was created, direct sends included.
    pub fn sent(&self) -> u64 {
        self.outbox.borrow().sent
    }
    /// How long libzmq may keep delivering already-accepted frames after the source is
    /// dropped (ZMQ_LINGER at close). Default 0: drop them.
    pub fn set_close_linger(&self, ms: i32) {
        self.close_linger_ms.set(ms);
    }
}
