//! Event handlers: each feeds one loop event to the state machines, then applies their
//! effects.

use super::*;

impl Gateway {
    pub(super) fn on_retransmit_timer(&mut self) {
        let (view, now) = (self.view(), Instant::now());
        self.delivery.on_retransmit_timer(view, now, &mut self.fx);
        let waiting = view.next_seq.saturating_sub(view.resume_seq());
        self.link.check_unheard(waiting, now);
        self.apply_effects();
    }

    /// `fsync = "always"`: the spool's helper thread synced readings; queue them.
    pub(super) fn on_spool_durable(&mut self) {
        if self.spool.poll_durable() {
            self.fill_outbox(Instant::now());
            self.apply_effects();
        }
    }

    pub(super) fn on_stats_timer(&mut self) {
        let m = self.stats_now();
        self.send(m);
        let view = self.view();
        self.delivery.check_replay_pace(view, Instant::now());
    }

    /// The `stats` message as of now.
    pub(super) fn stats_now(&mut self) -> Message {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let clock = self.clock_fields(Instant::now());
        stats::stats_message(&stats::StatsInput {
            gateway: &self.cfg.gateway.id,
            uptime: self.started.elapsed(),
            outbox: (self.outbox.len(), self.cfg.backend.outbox_max),
            sent: self.outbox.sent(),
            counters: &self.counters,
            retransmits: self.delivery.retransmits,
            link: &self.link,
            commands: &self.commands,
            spool: self.spool.stats(),
            view: self.view(),
            ports: &self.ports,
            now_ms,
            clock,
            suppressed: self.suppressed(),
        })
    }

    pub(super) fn on_zmq(&mut self, event: ZmqEvent) {
        let now = Instant::now();
        match event {
            ZmqEvent::Connected => {
                self.link.on_connected(now, &mut self.fx);
                let view = self.view();
                self.delivery.on_connected(view, now, &mut self.fx);
            }
            ZmqEvent::Disconnected => {
                self.link.on_disconnected(now, &mut self.fx);
                self.delivery.on_disconnected();
            }
            ZmqEvent::HandshakeFailed(why) => self.link.on_handshake_failed(&why, now),
            ZmqEvent::Drained => self.fill_outbox(now),
            ZmqEvent::Message(frames) => {
                self.link.on_heard(now, &mut self.fx);
                self.on_backend_message(frames, now);
            }
            ZmqEvent::TooManyFrames { frames } => {
                self.link.on_heard(now, &mut self.fx);
                self.commands.on_bad_frames(frames, now);
            }
        }
        self.apply_effects();
    }

    pub(super) fn on_backend_message(&mut self, frames: Vec<Vec<u8>>, now: Instant) {
        let [kind, body] = match <[Vec<u8>; 2]>::try_from(frames) {
            Ok(f) => f,
            Err(frames) => return self.commands.on_bad_frames(frames.len(), now),
        };
        match kind.as_slice() {
            b"ack" => match protocol::parse_ack(&body) {
                Ok(seq) => {
                    let (view, sent) = (self.view(), self.outbox.highest_reading_sent());
                    if self.delivery.accept_ack(seq, view, sent, now) {
                        self.on_ack(seq, now);
                    } else {
                        self.counters.bad_acks += 1;
                    }
                }
                Err(e) => self.commands.on_bad_ack(&e, now),
            },
            b"command" => self.on_command(&body, now),
            other => self
                .commands
                .on_unknown_kind(other, &body, now, &mut self.fx),
        }
    }

    pub(super) fn on_ack(&mut self, seq: u64, now: Instant) {
        match self.spool.ack(seq) {
            Ok(n) => {
                self.counters.acked += n;
                self.delivery.on_acked(n, now);
                if n > 0 {
                    self.arm_spool_tick(now);
                }
            }
            Err(e) => {
                self.counters.spool_errors += 1;
                if self.logs.allow("spool ack failed", now) {
                    log::error!("spool ack seq={seq} failed: {e}");
                }
            }
        }
    }

    pub(super) fn on_command(&mut self, body: &[u8], now: Instant) {
        let Some(cmd) = self.commands.on_command(body, now, &mut self.fx) else {
            return;
        };
        match self.execute(&cmd, now) {
            Ok(true) => self.commands.finish(&cmd.id, Ok(()), now, &mut self.fx),
            Ok(false) => {}
            Err(e) => self.commands.finish(&cmd.id, Err(e), now, &mut self.fx),
        }
    }

    /// Executes a command. `Ok(true)`: done now; `Ok(false)`: the reply follows later.
    pub(super) fn execute(&mut self, cmd: &Command, now: Instant) -> Result<bool, String> {
        if let Some(i) = self.outputs.find(&cmd.target) {
            let w = self.outputs.plan(i, &cmd.action)?;
            self.gpio
                .write(w.pin, w.level)
                .map_err(|e| format!("GPIO write failed: {e}"))?;
            self.outputs.applied(w, &cmd.action, now, &mut self.fx);
            log::info!(
                "command id={} target={} action={} level={}",
                cmd.id,
                cmd.target,
                cmd.action.name(),
                w.level
            );
            return Ok(true);
        }
        if let Some(port) = self.ports.get(&cmd.target) {
            let protocol::Action::Write(text) = &cmd.action else {
                return Err(format!("{} is a serial port: use write", cmd.target));
            };
            protocol::check_write_value(text, port.allow_binary)?;
            let mut data = text.clone().into_bytes();
            data.extend_from_slice(port.line_ending.as_bytes());
            let token = self.commands.next_write_token();
            port.handle.write(data, token).map_err(|e| match e {
                WriteError::NotConnected => format!("serial port {} is not connected", cmd.target),
                WriteError::Busy => format!("serial port {}: {e}", cmd.target),
            })?;
            self.commands.write_queued(token, &cmd.id);
            return Ok(false);
        }
        if self.inputs.has_name(&cmd.target) {
            return Err(format!(
                "{} is a GPIO input: it takes no commands",
                cmd.target
            ));
        }
        Err(format!("unknown target {:?}", cmd.target))
    }

    pub(super) fn on_edge(&mut self, edge: crate::hw::InputChange) {
        if let Some(i) = self.inputs.find_pin(edge.pin) {
            self.inputs
                .on_level(i, edge.level, Instant::now(), &mut self.fx);
            self.apply_effects();
        }
    }

    pub(super) fn on_serial(&mut self, name: &str, event: SerialEvent) {
        let now = Instant::now();
        match event {
            SerialEvent::Line(line) => {
                let Some(port) = self.ports.get_mut(name) else {
                    return;
                };
                if let Some(values) = port.on_line(name, &line, now) {
                    self.report_reading(name, &values, now);
                }
            }
            SerialEvent::Overlong(n) => {
                if let Some(port) = self.ports.get_mut(name) {
                    port.on_overlong(name, n, now);
                }
            }
            SerialEvent::Connected | SerialEvent::Disconnected(_) => {
                if let Some(port) = self.ports.get_mut(name) {
                    port.on_connection(event == SerialEvent::Connected);
                }
            }
            SerialEvent::WriteDone(token) => {
                if let Some(id) = self
                    .commands
                    .write_finished(token, Ok(()), now, &mut self.fx)
                {
                    log::info!("command id={id} target={name} action=write: written");
                }
            }
            SerialEvent::WriteFailed(token, why) => {
                self.commands
                    .write_finished(token, Err(why), now, &mut self.fx);
            }
        }
        self.apply_effects();
    }
}
