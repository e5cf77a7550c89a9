//! The ROUTER thread: a calloop loop owning the libzmq sockets (ROUTER, its monitor, the ZAP
//! handler), the channel from the NATS side and a periodic tick. libzmq sockets stay on this
//! one thread; the NATS side is reached only through bounded channels.
//!
//! ZMQ_FD is edge-triggered and any libzmq call may consume its edge, so after every wake
//! [`pump`] loops until a fresh ZMQ_EVENTS read of each socket shows nothing to read. Work per
//! wake is bounded ([`BUDGET`] messages); the rest waits for the next dispatch (a ping).

use crate::gateways::Gateways;
use crate::messages::ToRouter;
use calloop::channel::{Channel, Event};
use calloop::generic::{FdWrapper, Generic};
use calloop::ping::{make_ping, Ping};
use calloop::timer::{TimeoutAction, Timer};
use calloop::{EventLoop, Interest, Mode, PostAction};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// Messages from gateways handled per wake.
pub const BUDGET: usize = 1024;
/// Period of the tick (probes, timeouts) and of the counters log line (every 100 ticks).
pub const TICK: Duration = Duration::from_millis(250);

struct State {
    gw: Gateways,
    ping: Ping,
    ticks: u64,
}

fn readable(s: Option<&zmq::Socket>) -> bool {
    s.and_then(|s| s.get_events().ok())
        .is_some_and(|e| e.contains(zmq::POLLIN))
}

/// Handles everything the sockets hold now (up to [`BUDGET`] messages).
fn pump(st: &mut State) {
    loop {
        let now = Instant::now();
        let r = st.gw.router();
        if let Err(e) = r.serve_zap() {
            log::error!("ZAP handler: {e}");
        }
        match r.drain_monitor() {
            Ok(fds) if fds.is_empty() => {}
            Ok(fds) => st.gw.connection_closed(&fds, now),
            Err(e) => log::error!("monitor: {e}"),
        }
        let mut n = 0;
        while n < BUDGET {
            match st.gw.router().recv_message() {
                Ok(Some(m)) => st.gw.on_received(m, now),
                Ok(None) => break,
                Err(e) => {
                    log::error!("ROUTER recv: {e}");
                    break;
                }
            }
            n += 1;
        }
        st.gw.flush_acks();
        if n == BUDGET {
            st.ping.ping();
            return;
        }
        let r = st.gw.router();
        if !readable(Some(r.socket())) && !readable(Some(r.monitor())) && !readable(r.zap_socket())
        {
            return;
        }
    }
}

/// Wraps a ZMQ_FD for the loop.
///
/// # Safety
/// `fd` must stay open for as long as the returned source lives (the sockets live in
/// [`State`], which outlives the loop's sources).
unsafe fn zmq_fd(fd: RawFd) -> Generic<FdWrapper<RawFd>> {
    // SAFETY: guaranteed by the caller.
    Generic::new(unsafe { FdWrapper::new(fd) }, Interest::READ, Mode::Edge)
}

/// Runs the ROUTER thread until the channel from the NATS side closes.
pub fn run(gw: Gateways, from_nats: Channel<ToRouter>) -> anyhow::Result<()> {
    let mut lp: EventLoop<State> = EventLoop::try_new()?;
    let h = lp.handle();
    let (ping, ping_src) = make_ping()?;
    let mut st = State { gw, ping, ticks: 0 };
    let fds: Vec<RawFd> = {
        let r = st.gw.router();
        let mut v = vec![r.socket().get_fd()?, r.monitor().get_fd()?];
        if let Some(z) = r.zap_socket() {
            v.push(z.get_fd()?);
        }
        v
    };
    for fd in fds {
        // SAFETY: the sockets live in `st`, which outlives `lp`'s dispatching below; the
        // loop is dropped before `st` at the end of this function.
        h.insert_source(unsafe { zmq_fd(fd) }, |_, _, st: &mut State| {
            pump(st);
            Ok(PostAction::Continue)
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    h.insert_source(ping_src, |_, _, st: &mut State| pump(st))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    h.insert_source(from_nats, |ev, _, st: &mut State| match ev {
        Event::Msg(m) => {
            st.gw.on_nats(m, Instant::now());
            pump(st);
        }
        Event::Closed => st.ticks = u64::MAX,
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    h.insert_source(Timer::from_duration(TICK), |_, _, st: &mut State| {
        st.gw.tick(Instant::now());
        st.ticks = st.ticks.saturating_add(1);
        if st.ticks % 40 == 0 {
            let c = st.gw.counters;
            log::info!(
                "counters published={} confirmed={} failed={} acks_advanced={} over_limit={}",
                c.published,
                c.confirmed,
                c.failed,
                c.acks_advanced,
                c.over_limit
            );
        }
        pump(st);
        TimeoutAction::ToDuration(TICK)
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    // A first pump: anything that arrived before the sources were registered.
    pump(&mut st);
    while st.ticks != u64::MAX {
        lp.dispatch(Some(Duration::from_secs(1)), &mut st)?;
    }
    drop(lp);
    Ok(())
}
