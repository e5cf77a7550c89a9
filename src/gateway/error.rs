//! Errors that stop the gateway, each with its cause.

use super::command_log::CommandLogError;
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
    /// The command log could not be opened.
    #[error(transparent)]
    CommandLog(#[from] CommandLogError),
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

/// An error with its whole chain of causes, for a log line.
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
