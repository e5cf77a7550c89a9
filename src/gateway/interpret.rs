//! The interpreter: applies the state machines' effects to the loop, the socket, the spool
//! and the hardware.

use super::*;

impl Gateway {
    /// Applies every waiting effect, in order (an effect may queue more).
    pub(super) fn apply_effects(&mut self) {
        while let Some(e) = self.fx.pop() {
            self.apply(e);
        }
    }

    pub(super) fn apply(&mut self, effect: Effect) {
        let now = Instant::now();
        match effect {
            Effect::Send(m) => self.send(m),
            Effect::Hello => {
                let hello = self.hello();
                if self.outbox.with(|o| o.push_hello(hello)).is_err() {
                    self.counters.dropped_control += 1;
                    if self.logs.allow("hello dropped", now) {
                        log::warn!("outbox full: hello dropped (control reserve taken)");
                    }
                }
            }
            Effect::DropQueuedReadings => self
                .outbox
                .with(|o| o.retain(|m| m.kind != protocol::KIND_READING)),
            Effect::Fill => self.fill_outbox(now),
            Effect::ReadSpool { from, max } => self.read_spool(from, max),
            Effect::Arm(id, at) => self.arm(id, at),
            Effect::Cancel(id) => {
                if let Some(t) = self.timers.remove(&id) {
                    self.handle.remove(t);
                }
            }
            Effect::CheckConnection => self.outbox.request_connection_check(),
            Effect::Reconnect => self.outbox.request_reconnect(),
            Effect::EndPulse { output, level } => {
                let Some(pin) = self.outputs.get(output).map(|o| o.pin) else {
                    return;
                };
                let result = self.gpio.write(pin, level).map_err(|e| e.to_string());
                self.outputs
                    .pulse_ended(output, level, result, &mut self.fx);
            }
            Effect::ReadInput(i) => {
                let Some(pin) = self.inputs.get(i).map(|x| x.pin) else {
                    return;
                };
                match self.gpio.read(pin) {
                    Ok(level) => self.inputs.on_level(i, level, now, &mut self.fx),
                    Err(e) => log::warn!("debounce re-read failed pin={pin} error=\"{e}\""),
                }
            }
            Effect::Reading { input, level } => {
                let Some(name) = self.inputs.get(input).map(|x| x.name.clone()) else {
                    return;
                };
                self.report_reading(&name, &Values::single("level", &json!(level)), now);
            }
            Effect::OutputLevel {
                output,
                level,
                cause,
            } => {
                let Some(name) = self.outputs.get(output).map(|x| x.name.clone()) else {
                    return;
                };
                let values =
                    Values::pairs(&[("level", &json!(level)), ("cause", &json!(cause.as_str()))]);
                self.emit_reading(&name, &values, now);
            }
            Effect::RememberReply { id, entry } => self.remember_reply(&id, &entry, now),
        }
    }

    /// Arms (or moves) the one-shot timer `id`.
    pub(super) fn arm(&mut self, id: TimerId, at: Instant) {
        if let Some(t) = self.timers.remove(&id) {
            self.handle.remove(t);
        }
        match self
            .handle
            .insert_source(Timer::from_deadline(at), move |_, _, gw: &mut Gateway| {
                gw.timers.remove(&id);
                gw.on_timer(id);
                TimeoutAction::Drop
            }) {
            Ok(t) => {
                self.timers.insert(id, t);
            }
            Err(e) => log::error!("cannot arm timer {id:?}: {}", e.error),
        }
    }

    pub(super) fn on_timer(&mut self, id: TimerId) {
        let now = Instant::now();
        match id {
            TimerId::ConnCheck => self.link.on_check_timer(now, &mut self.fx),
            TimerId::Replay => {
                let (view, room) = (self.view(), self.outbox.room());
                self.delivery.on_replay_timer(view, room, now, &mut self.fx);
            }
            TimerId::SpoolTick => {
                if let Err(e) = self.command_log.tick() {
                    if self.logs.allow("command log sync failed", now) {
                        log::error!("{e}");
                    }
                }
                if let Err(e) = self.spool.tick() {
                    self.counters.spool_errors += 1;
                    if self.logs.allow("spool tick failed", now) {
                        log::error!("spool tick failed: {e}");
                    }
                }
                // A stalled disk leaves work for the next tick (bounded by the helper queue).
                if self.spool.wants_tick() {
                    self.arm_spool_tick(now);
                }
            }
            TimerId::Pulse(i) => self.outputs.pulse_due(i, now, &mut self.fx),
            TimerId::Debounce(i) => self.inputs.debounce_due(i, &mut self.fx),
            TimerId::HelloTimeout => self.link.on_hello_timer(now, &mut self.fx),
            TimerId::Reconnect => self.link.on_reconnect_timer(now, &mut self.fx),
            TimerId::Report => self.on_report_timer(now),
        }
        self.apply_effects();
    }

    /// Appends a command's answer to the command log (a buffered write; synced at the
    /// spool's interval tick), compacting it when it has grown.
    fn remember_reply(&mut self, id: &str, entry: &commands::CachedReply, now: Instant) {
        match self.command_log.append(id, entry) {
            Ok(true) => self.command_log.compact(self.commands.remembered()),
            Ok(false) => {}
            Err(e) => {
                if self.logs.allow("command log append failed", now) {
                    log::error!(
                        "command log append failed path={} error=\"{e}\": id={id} is \
                         remembered until the gateway stops",
                        self.command_log.path().display()
                    );
                }
            }
        }
        self.arm_spool_tick(now);
    }

    /// Schedules one spool tick (interval fsync, ack persistence) if none is pending.
    /// One-shot, so an idle gateway has no spool wake-ups.
    pub(super) fn arm_spool_tick(&mut self, now: Instant) {
        if !self.timers.contains_key(&TimerId::SpoolTick) {
            let interval = Duration::from_millis(self.cfg.spool.fsync_interval_ms);
            self.arm(TimerId::SpoolTick, now + interval);
        }
    }

    /// Queues a control message (reply, stats). Readings never take their places (see
    /// `Outbox::push_control`); if even those are full, the message is dropped and counted.
    pub(super) fn send(&mut self, m: Message) {
        let kind = m.kind;
        if self.outbox.with(|o| o.push_control(m)).is_err() {
            self.counters.dropped_control += 1;
            if self.logs.allow("outbox full", Instant::now()) {
                log::warn!(
                    "outbox full max={}: {kind} message dropped",
                    self.cfg.backend.outbox_max
                );
            }
        }
    }

    /// Queues reading `seq` (its `body`) straight from memory, as [`Delivery`] allowed; true
    /// when the outbox took it.
    ///
    /// [`Delivery`]: super::delivery::Delivery
    fn push_direct(&mut self, seq: u64, body: String) -> bool {
        let m = Message {
            kind: protocol::KIND_READING,
            body,
        };
        let pushed = self.outbox.push(m).is_ok();
        if pushed {
            self.delivery.direct_pushed(seq);
        }
        pushed
    }

    /// Stores a reading (its wall-clock `time`, in ms and as text) in the spool, then lets the
    /// outbox take it if it has room.
    pub(super) fn store_reading(
        &mut self,
        source: &str,
        values: &Values,
        now: Instant,
        time_ms: u64,
        time: &str,
        extra: protocol::ReadingExtra<'_>,
    ) {
        let gateway = &self.cfg.gateway.id;
        let mut body = String::new();
        let buf = &mut body;
        let appended = self.spool.append_with(time_ms, move |seq| {
            let buf = buf; // moved: the closure is FnOnce and may return a borrow of it
            protocol::write_reading_body_with(buf, gateway, seq, source, time, values, extra);
            buf.as_bytes()
        });
        match appended {
            Ok(Appended::Stored {
                seq,
                dropped_oldest,
            }) => {
                self.counters.readings += 1;
                self.counters.dropped += dropped_oldest;
                let view = self.view();
                // Nothing older waits in the spool: straight into the outbox, without being
                // read back from disk.
                if self.delivery.on_stored(seq, view, now) {
                    self.push_direct(seq, body);
                }
            }
            Ok(Appended::DroppedNewest) => {
                self.counters.dropped += 1;
                if self.logs.allow("spool full", now) {
                    log::warn!(
                        "spool full max_bytes={}: reading from {source} dropped (when_full = drop_newest)",
                        self.cfg.spool.max_bytes
                    );
                }
            }
            Err(e) => {
                if let Some(seq) = e.unstored_seq() {
                    // A full file system is a full budget the spool could not free: a reading
                    // that is next in line still goes out from memory while connected.
                    let view = self.view();
                    let pushed =
                        self.delivery.on_unstored(seq, view, now) && self.push_direct(seq, body);
                    if pushed {
                        self.counters.readings += 1;
                        if self.logs.allow("disk full", now) {
                            log::warn!(
                                "{e}: reading seq={seq} from {source} sent from memory only"
                            );
                        }
                    } else {
                        self.counters.dropped += 1;
                        self.delivery.skip_unstored(seq);
                        if self.logs.allow("disk full", now) {
                            log::error!("{e}: reading seq={seq} from {source} lost");
                        }
                    }
                } else {
                    self.counters.spool_errors += 1;
                    if self.logs.allow("spool append failed", now) {
                        log::error!("spool append failed: {e}: reading from {source} lost");
                    }
                }
            }
        }
        self.arm_spool_tick(now);
        self.fill_outbox(now);
    }

    pub(super) fn fill_outbox(&mut self, now: Instant) {
        // Skips the spool look-up on the hot path (nothing waits: nothing to fill).
        if self.delivery.caught_up(self.spool.sendable_end()) {
            return;
        }
        let (view, room) = (self.view(), self.outbox.room());
        self.delivery.fill(view, room, now, &mut self.fx);
    }

    /// [`Effect::ReadSpool`]: moves readings from `from` on into the outbox while it has
    /// room, in seq order, and tells delivery where it stopped.
    pub(super) fn read_spool(&mut self, from: u64, max: usize) {
        let mut batch = Vec::new();
        let end = self.spool.sendable_end();
        if let Err(e) = self.spool.read_range(from, end, max, &mut batch) {
            self.counters.spool_errors += 1;
            if self.logs.allow("spool read failed", Instant::now()) {
                log::error!("spool read failed from seq={from}: {e}");
            }
            self.delivery.read_failed();
            return;
        }
        let view = self.view();
        if batch.is_empty() {
            // Everything from `from` on was acked or dropped meanwhile.
            self.delivery.replayed(None, view);
            return;
        }
        let mut next = from;
        self.outbox.with(|o| {
            for (seq, payload) in batch {
                match String::from_utf8(payload) {
                    Ok(body) => {
                        let m = Message {
                            kind: protocol::KIND_READING,
                            body,
                        };
                        if o.push_back(m).is_err() {
                            break;
                        }
                    }
                    Err(_) => log::error!("spool record seq={seq} is not UTF-8: skipped"),
                }
                next = seq + 1;
            }
        });
        self.delivery.replayed(Some(next), view);
    }
}
