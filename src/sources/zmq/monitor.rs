//! Reading libzmq socket-monitor events (`zmq_socket_monitor`), shared by the gateway's
//! source and the reference backend.

/// One event from a socket monitor (`zmq_socket_monitor`).
#[derive(Debug)]
pub struct MonitorEvent {
    /// What happened (connected, handshake succeeded or failed, disconnected, ...).
    pub event: zmq::SocketEvent,
    /// The event's value: an fd, an errno or a ZAP/protocol status, depending on the event.
    pub value: u32,
    /// The endpoint address the event is about.
    pub addr: String,
}

/// Receives the next monitor event without blocking; `None` when there is none. Malformed
/// monitor messages are skipped.
pub fn recv_monitor_event(monitor: &zmq::Socket) -> zmq::Result<Option<MonitorEvent>> {
    loop {
        let frames = match monitor.recv_multipart(zmq::DONTWAIT) {
            Ok(f) => f,
            Err(zmq::Error::EAGAIN) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(head) = frames.first().filter(|f| f.len() >= 6) else {
            continue;
        };
        let event = zmq::SocketEvent::from_raw(u16::from_ne_bytes([head[0], head[1]]));
        let value = u32::from_ne_bytes([head[2], head[3], head[4], head[5]]);
        let addr = frames
            .get(1)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .unwrap_or_default();
        return Ok(Some(MonitorEvent { event, value, addr }));
    }
}
