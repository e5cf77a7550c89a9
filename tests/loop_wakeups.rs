//! The event loop's own cost per wake-up: calloop over the patched `polling` of
//! `vendor/polling` (see vendor/README.md). Upstream polling reads its notifier eventfd (and
//! re-arms it and its timerfd: three more calls) on every wait; here a wake-up that no
//! notification caused reads nothing but what the woken source reads, and timers still fire
//! when due however the deadlines move. `make bench` item 8 counts every kind of call.

use calloop::generic::Generic;
use calloop::timer::{TimeoutAction, Timer};
use calloop::{EventLoop, Interest, Mode, PostAction};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// read(2)-like calls of the calling thread so far (`syscr` of /proc/thread-self/io).
fn reads_of_this_thread() -> u64 {
    let io = std::fs::read_to_string("/proc/thread-self/io")
        .expect("/proc/thread-self/io (kernel built with task I/O accounting)");
    io.lines()
        .find_map(|l| l.strip_prefix("syscr:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("syscr in /proc/thread-self/io")
}

fn eventfd() -> OwnedFd {
    // SAFETY: plain syscall; the fd is checked and then owned.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn bump(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    assert_eq!(nix::unistd::write(fd, &one).unwrap(), 8);
}

#[derive(Default)]
struct State {
    wakes: u32,
    fired: Vec<(&'static str, Instant)>,
}

/// An edge-triggered eventfd that is never read: every write is one wake-up, and its callback
/// makes no call at all. A far timer gives the loop a deadline that does not change.
#[test]
fn a_wake_up_makes_no_read_of_its_own() {
    let mut ev: EventLoop<State> = EventLoop::try_new().unwrap();
    let efd = eventfd();
    let writer = efd.try_clone().unwrap();
    ev.handle()
        .insert_source(
            Generic::new(efd, Interest::READ, Mode::Edge),
            |_, _, st: &mut State| {
                st.wakes += 1;
                Ok(PostAction::Continue)
            },
        )
        .unwrap();
    ev.handle()
        .insert_source(Timer::from_duration(Duration::from_secs(600)), |_, _, _| {
            TimeoutAction::Drop
        })
        .unwrap();
    let mut st = State::default();
    bump(&writer);
    ev.dispatch(Some(Duration::from_secs(5)), &mut st).unwrap();
    let before = reads_of_this_thread();
    let wakes_before = st.wakes;
    for _ in 0..200 {
        bump(&writer);
        ev.dispatch(None, &mut st).unwrap();
    }
    let reads = reads_of_this_thread() - before;
    assert_eq!(st.wakes - wakes_before, 200, "one wake-up per write");
    assert!(
        reads < 20,
        "{reads} reads for 200 wake-ups: the poller reads its notifier on every wait"
    );
}

/// Timers fire when due while unrelated wake-ups come every millisecond (the deadline stays
/// put), and a timer added with an earlier deadline than the armed one fires at its own.
#[test]
fn timers_fire_when_due_however_the_deadline_moves() {
    let mut ev: EventLoop<State> = EventLoop::try_new().unwrap();
    let efd = eventfd();
    let writer = efd.try_clone().unwrap();
    ev.handle()
        .insert_source(
            Generic::new(efd, Interest::READ, Mode::Edge),
            |_, _, st: &mut State| {
                st.wakes += 1;
                Ok(PostAction::Continue)
            },
        )
        .unwrap();
    let h = ev.handle();
    let start = Instant::now();
    for (name, ms) in [("a", 30u64), ("b", 60)] {
        h.insert_source(
            Timer::from_duration(Duration::from_millis(ms)),
            move |_, _, st: &mut State| {
                st.fired.push((name, Instant::now()));
                TimeoutAction::Drop
            },
        )
        .unwrap();
    }
    let mut st = State::default();
    while st.fired.len() < 2 && start.elapsed() < Duration::from_secs(2) {
        bump(&writer);
        ev.dispatch(None, &mut st).unwrap();
        std::thread::sleep(Duration::from_millis(1));
        // No wake-up pending now: the next dispatch may block until a timer is due.
        ev.dispatch(Some(Duration::from_millis(1)), &mut st)
            .unwrap();
    }
    assert!(st.wakes > 20, "wake-ups in between: {}", st.wakes);
    let at = |st: &State, name| {
        st.fired
            .iter()
            .find(|f| f.0 == name)
            .map(|f| f.1.duration_since(start))
            .unwrap_or_else(|| panic!("timer {name} never fired: {:?}", st.fired))
    };
    let (a, b) = (at(&st, "a"), at(&st, "b"));
    assert!(
        a >= Duration::from_millis(30) && a < Duration::from_millis(45),
        "a at {a:?}"
    );
    assert!(
        b >= Duration::from_millis(60) && b < Duration::from_millis(75),
        "b at {b:?}"
    );

    // Armed far ahead and waited on; then an earlier timer comes in.
    let start = Instant::now();
    h.insert_source(Timer::from_duration(Duration::from_secs(600)), |_, _, _| {
        TimeoutAction::Drop
    })
    .unwrap();
    bump(&writer);
    ev.dispatch(None, &mut st).unwrap();
    h.insert_source(
        Timer::from_duration(Duration::from_millis(20)),
        move |_, _, st: &mut State| {
            st.fired.push(("c", Instant::now()));
            TimeoutAction::Drop
        },
    )
    .unwrap();
    while !st.fired.iter().any(|f| f.0 == "c") && start.elapsed() < Duration::from_secs(2) {
        ev.dispatch(None, &mut st).unwrap();
    }
    let c_after = st
        .fired
        .iter()
        .find(|f| f.0 == "c")
        .map(|f| f.1.duration_since(start))
        .expect("c fired");
    assert!(
        c_after >= Duration::from_millis(20) && c_after < Duration::from_millis(35),
        "c at {c_after:?}"
    );
}
