//! The forced reconnect, asked for with [`super::OutboxHandle::request_reconnect`] when the
//! backend is not heard on a connection.

use super::{ZmqEvent, ZmqSource};

impl ZmqSource {
    /// When a forced reconnect was requested: drops the connection, dials again and reports
    /// the drop. libzmq's monitor reports no
    /// DISCONNECTED for a connection the socket closed itself, so the source does, and closes
    /// the gate: nothing goes out before the new connection's `Connected` (and hello). Runs
    /// before the pump, whose fresh ZMQ_EVENTS read covers any edge these calls consumed.
    pub(super) fn forced_reconnect<F>(&mut self, callback: &mut F)
    where
        F: FnMut(ZmqEvent, &mut ()),
    {
        if !self.reconnect_requested.replace(false) {
            return;
        }
        let Some(ep) = self.endpoint.clone() else {
            return;
        };
        self.awaiting_retry = false;
        let _ = self.socket.disconnect(&ep);
        if let Err(e) = self.socket.connect(&ep) {
            log::error!("reconnecting to {ep} failed: {e}");
        }
        if self.connected.replace(false) {
            callback(ZmqEvent::Disconnected, &mut ());
        }
    }
}
