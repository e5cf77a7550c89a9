//! Errors that stop the gateway, each with its cause.

use crate::hw::HwError;
use crate::spool::SpoolError;

/// Errors that stop the gateway from starting or running. Each carries its cause.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A libzmq call failed.
    #[error("ZeroMQ error while {what}: {source}")]
    Zmq {
        /// What the gateway was doing.
        what: &'static str,
        /// libzmq's error.
        #[source]
        source: zmq::Error,
    },
    /// The backend socket's event source could not be set up.
    #[error("backend link: {0}")]
    ZmqSource(#[from] crate::sources::zmq::ZmqSourceError),
    /// The GPIO backend failed.
    #[error(transparent)]
    Hw(#[from] HwError),
    /// A serial port could not be opened.
    #[error("cannot open serial port {name}: {source}")]
    Serial {
        /// The port's name.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The event loop, or one of its sources, failed.
    #[error("event loop error while {what}: {source}")]
    Loop {
        /// What the gateway was doing.
        what: &'static str,
        /// calloop's error; a source's own error is its source.
        #[source]
        source: calloop::Error,
    },
    /// The spool could not be opened.
    #[error("spool: {0}")]
    Spool(#[from] SpoolError),
    /// The link security settings are unusable.
    #[error("link security: {0}")]
    Security(String),
}

pub(super) fn lerr(what: &'static str) -> impl FnOnce(calloop::Error) -> GatewayError {
    move |source| GatewayError::Loop { what, source }
}

pub(super) fn ierr<T>(what: &'static str) -> impl FnOnce(calloop::InsertError<T>) -> GatewayError {
    move |e| GatewayError::Loop {
        what,
        source: e.error,
    }
}

/// An error with its whole chain of causes, for a log line. A cause whose text the message
/// already ends with (most errors print their source) is not repeated.
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::zmq::ZmqSourceError;

    /// A source error that stops the loop is logged with each cause once: the operation and
    /// libzmq's error, however many layers (calloop, GatewayError) print it again.
    #[test]
    fn chain_names_each_cause_once() {
        let source = ZmqSourceError::Zmq {
            what: "sending a message to the backend",
            source: zmq::Error::ETERM,
        };
        let e = GatewayError::Loop {
            what: "running the event loop",
            source: calloop::Error::OtherError(Box::new(source)),
        };
        let text = chain(&e);
        let cause = zmq::Error::ETERM.to_string();
        assert!(text.contains("sending a message to the backend"), "{text}");
        assert_eq!(text.matches(&cause).count(), 1, "{text}");
        assert!(text.ends_with(&cause), "{text}");
    }
}
