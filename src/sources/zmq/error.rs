//! [`ZmqSourceError`]: why the backend source could not start or stopped, with its cause.

use calloop::ping::PingError;

/// Why [`ZmqSource`](super::ZmqSource) could not be created or stopped dispatching. Each
/// variant names the operation and carries the OS or libzmq cause; the gateway logs the whole
/// chain and exits (after writing the spool state), and a service manager restarts it.
#[derive(Debug, thiserror::Error)]
pub enum ZmqSourceError {
    /// A libzmq call failed. ETERM means the context was terminated (the process is shutting
    /// down); EMFILE/ENFILE mean the process or system is out of file descriptors (raise
    /// `LimitNOFILE=`); anything else is a libzmq or zgate bug worth reporting.
    #[error("libzmq failed while {what}: {source}")]
    Zmq {
        /// The operation, e.g. "reading ZMQ_EVENTS".
        what: &'static str,
        /// libzmq's error.
        #[source]
        source: zmq::Error,
    },
    /// The source's wake-up eventfd could not be created (out of file descriptors: raise
    /// `LimitNOFILE=`).
    #[error("creating the backend source's wake-up eventfd failed: {0}")]
    WakeCreate(#[source] std::io::Error),
    /// Reading the source's wake-up eventfd failed (the descriptor was closed under it).
    #[error("reading the backend source's wake-up eventfd failed: {0}")]
    Wake(#[source] PingError),
    /// Polling a ZMQ_FD failed (the descriptor was closed under the source).
    #[error("polling the {which} ZMQ_FD failed: {source}")]
    Fd {
        /// "socket" or "monitor".
        which: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Attaches an operation's name to a libzmq error.
pub(super) fn zerr(what: &'static str) -> impl FnOnce(zmq::Error) -> ZmqSourceError {
    move |source| ZmqSourceError::Zmq { what, source }
}
