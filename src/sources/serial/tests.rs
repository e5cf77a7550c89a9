use super::*;
use crate::protocol::MAX_LINE;
use calloop::EventLoop;
use nix::pty::openpty;
use std::io::Write;
use std::os::fd::OwnedFd;

struct St {
    events: Vec<SerialEvent>,
}

fn pty() -> (OwnedFd, PathBuf) {
    let p = openpty(None, None).unwrap();
    let path = std::fs::read_link(format!("/proc/self/fd/{}", p.slave.as_raw_fd())).unwrap();
    // Keep the slave open in the test too? No: close it so the gateway's open is the only one.
    drop(p.slave);
    (p.master, path)
}

fn run_until(ev: &mut EventLoop<St>, st: &mut St, pred: impl Fn(&St) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pred(st) {
        assert!(
            Instant::now() < deadline,
            "timeout; events so far: {:?}",
            st.events
        );
        ev.dispatch(Some(Duration::from_millis(20)), st).unwrap();
    }
}

#[test]
fn open_tty_sets_raw_mode_and_rejects_odd_bauds() {
    let (_m, path) = pty();
    let fd = open_tty(&path, 115200).unwrap();
    let t = nix::sys::termios::tcgetattr(&fd).unwrap();
    assert_eq!(nix::sys::termios::cfgetospeed(&t), BaudRate::B115200);
    assert!(!t.local_flags.contains(nix::sys::termios::LocalFlags::ECHO));
    assert!(open_tty(&path, 12345)
        .unwrap_err()
        .contains("unsupported baud"));
    assert!(open_tty(Path::new("/nonexistent/tty"), 9600).is_err());
    assert!(open_tty(Path::new("/dev/null"), 9600)
        .unwrap_err()
        .contains("terminal"));
}

fn frame_all(ending: InputLineEnding, chunks: &[&[u8]]) -> Vec<SerialEvent> {
    let mut f = LineFramer::new(ending);
    let mut out = Vec::new();
    for c in chunks {
        f.push(c, &mut |e| out.push(e));
    }
    out
}

fn line(s: &str) -> SerialEvent {
    SerialEvent::Line(s.as_bytes().to_vec())
}

#[test]
fn frames_lines_and_overlong() {
    let long = vec![b'x'; MAX_LINE + 10];
    let exact = vec![b'z'; MAX_LINE];
    for ending in [InputLineEnding::Auto, InputLineEnding::Lf] {
        let out = frame_all(
            ending,
            &[
                b"a=1\r\nb=",
                b"2\n\n\r\n",
                &long,
                b"yy\nok\n",
                &exact,
                b"\r\n",
            ],
        );
        assert_eq!(
            out,
            vec![
                line("a=1"),
                line("b=2"),
                SerialEvent::Overlong(MAX_LINE + 12),
                line("ok"),
                SerialEvent::Line(exact.clone()),
            ],
            "{ending:?}"
        );
    }
}

/// A sensor that ends lines with CR alone: every line is a reading (before, LF-only
/// framing made 2,000 such lines one overlong line).
#[test]
fn cr_terminated_lines_each_make_a_line() {
    let text: Vec<u8> = (0..2000)
        .flat_map(|i| format!("n={i}\r").into_bytes())
        .collect();
    for ending in [InputLineEnding::Auto, InputLineEnding::Cr] {
        let mut f = LineFramer::new(ending);
        let mut out = Vec::new();
        for chunk in text.chunks(READ_CHUNK) {
            f.push(chunk, &mut |e| out.push(e));
        }
        assert_eq!(out.len(), 2000, "{ending:?}");
        for (i, e) in out.iter().enumerate() {
            assert_eq!(*e, line(&format!("n={i}")), "{ending:?}");
        }
    }
}

#[test]
fn auto_takes_mixed_endings_and_split_crlf_as_one() {
    let out = frame_all(
        InputLineEnding::Auto,
        &[b"a=1\nb=2\rc=3\r\nd=4\r", b"\ne=5\r", b"\n", b"f=6\n"],
    );
    assert_eq!(
        out,
        vec![
            line("a=1"),
            line("b=2"),
            line("c=3"),
            line("d=4"),
            line("e=5"),
            line("f=6")
        ]
    );
}

#[test]
fn explicit_endings() {
    // lf: a lone CR is part of the line.
    assert_eq!(
        frame_all(InputLineEnding::Lf, &[b"a\rb\n", b"c\r", b"\n"]),
        vec![line("a\rb"), line("c")]
    );
    // cr: LF is an ordinary byte.
    assert_eq!(
        frame_all(InputLineEnding::Cr, &[b"a\nb\rc\r"]),
        vec![line("a\nb"), line("c")]
    );
    // crlf: only the pair ends a line, also when split across reads.
    assert_eq!(
        frame_all(
            InputLineEnding::Crlf,
            &[b"a\nb\rc\r\nd\r", b"\n", b"e\n\r\n"]
        ),
        vec![line("a\nb\rc"), line("d"), line("e\n")]
    );
    // An overlong line in crlf mode ends at its CR LF, split across reads.
    let long = vec![b'x'; MAX_LINE + 5];
    assert_eq!(
        frame_all(InputLineEnding::Crlf, &[&long, b"\r", b"\nok\r\n"]),
        vec![SerialEvent::Overlong(MAX_LINE + 6), line("ok")]
    );
}

#[test]
fn baud_rates_match_the_config_list() {
    for b in crate::config::STANDARD_BAUD_RATES {
        assert!(baud_rate(b).is_some(), "{b}");
    }
    for b in 0..=4_000_000u32 {
        if baud_rate(b).is_some() {
            assert!(crate::config::STANDARD_BAUD_RATES.contains(&b), "{b}");
        }
    }
}

#[test]
fn write_queue_times_out_by_deadline() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut q = WriteQueue::new(ms(100));
    q.push(b"abc".to_vec(), 1, t0).unwrap();
    q.push(b"de".to_vec(), 2, t0 + ms(30)).unwrap();
    assert_eq!(q.next_deadline(), Some(t0 + ms(100)));
    assert_eq!(q.expire(t0 + ms(99)), vec![]);
    q.pending[0].done = 1;
    assert_eq!(
        q.expire(t0 + ms(100)),
        vec![Expired {
            token: 1,
            partial: true
        }]
    );
    assert_eq!(q.pending_bytes, 2);
    assert_eq!(q.next_deadline(), Some(t0 + ms(130)));
    assert_eq!(
        q.expire(t0 + ms(500)),
        vec![Expired {
            token: 2,
            partial: false
        }]
    );
    assert_eq!((q.pending_bytes, q.next_deadline()), (0, None));
    // The bound counts only what is still queued.
    q.push(vec![0; MAX_PENDING_WRITE], 3, t0).unwrap();
    assert_eq!(q.push(vec![0], 4, t0), Err(WriteError::Busy));
    assert_eq!(q.clear(), vec![3]);
    q.push(vec![0], 5, t0).unwrap();
}

/// A device that never takes the data: the write fails after the timeout, the port stays
/// open, and once the device reads again a new write goes through.
#[test]
fn a_write_the_device_never_takes_times_out() {
    let (master, path) = pty();
    let timeout = Duration::from_millis(300);
    let source = SerialSource::new("t", &path, 9600)
        .unwrap()
        .write_timeout(timeout);
    let handle = source.handle();
    let mut ev: EventLoop<St> = EventLoop::try_new().unwrap();
    ev.handle()
        .insert_source(source, |e, _, st: &mut St| st.events.push(e))
        .unwrap();
    let mut st = St { events: vec![] };
    run_until(&mut ev, &mut st, |st| {
        st.events.contains(&SerialEvent::Connected)
    });
    // More than the pty buffer holds, and nobody reads the master.
    let started = Instant::now();
    handle.write(vec![b'x'; 60_000], 1).unwrap();
    run_until(&mut ev, &mut st, |st| {
        st.events
            .iter()
            .any(|e| matches!(e, SerialEvent::WriteFailed(1, _)))
    });
    let took = started.elapsed();
    assert!(
        took >= timeout && took < timeout * 3,
        "failed after {took:?}"
    );
    let why = st
        .events
        .iter()
        .find_map(|e| match e {
            SerialEvent::WriteFailed(1, why) => Some(why.clone()),
            _ => None,
        })
        .unwrap();
    assert!(why.contains("timed out"), "{why}");
    assert!(!st
        .events
        .iter()
        .any(|e| matches!(e, SerialEvent::Disconnected(_) | SerialEvent::WriteDone(1))));
    assert!(handle.is_connected());

    // The device drains what reached the tty; a new write is taken whole.
    let mfd = master.as_raw_fd();
    nix::fcntl::fcntl(
        mfd,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match nix::unistd::read(mfd, &mut buf) {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    assert!(got.len() < 60_000, "the unsent bytes were discarded");
    handle.write(b"OK\n".to_vec(), 2).unwrap();
    run_until(&mut ev, &mut st, |st| {
        st.events.contains(&SerialEvent::WriteDone(2))
    });
    let deadline = Instant::now() + Duration::from_secs(2);
    while !got.ends_with(b"OK\n") && Instant::now() < deadline {
        if let Ok(n) = nix::unistd::read(mfd, &mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
    }
    assert!(got.ends_with(b"OK\n"), "{} bytes", got.len());
    assert!(
        got.iter()
            .all(|&b| b == b'x' || b == b'O' || b == b'K' || b == b'\n'),
        "bytes pass unchanged"
    );
    drop(master);
}

/// A flood of short lines must not hold the loop: one wake handles one chunk once the
/// time budget is spent, and the rest follows on later dispatches (the tty is edge-triggered:
/// the source pings itself to go on; without that the rest would wait for new data).
/// Before the time budget, all 4000 bytes (1000 lines) were handled in one wake.
#[test]
fn a_flood_of_lines_yields_the_loop() {
    let (master, path) = pty();
    let source = SerialSource::new("t", &path, 9600).unwrap();
    let mut ev: EventLoop<St> = EventLoop::try_new().unwrap();
    ev.handle()
        .insert_source(source, |e, _, st: &mut St| {
            if matches!(e, SerialEvent::Line(_)) {
                // Each line costs 100 µs (a slow reading pipeline).
                std::thread::sleep(Duration::from_micros(100));
            }
            st.events.push(e)
        })
        .unwrap();
    let mut st = St { events: vec![] };
    run_until(&mut ev, &mut st, |st| {
        st.events.contains(&SerialEvent::Connected)
    });
    st.events.clear();
    let mut m = std::fs::File::from(master);
    m.write_all(&b"a=1\n".repeat(1000)).unwrap();
    ev.dispatch(Some(Duration::from_secs(2)), &mut st).unwrap();
    let first = st.events.len();
    assert!(
        first > 0 && first <= READ_CHUNK / 4,
        "one wake handled {first} lines"
    );
    run_until(&mut ev, &mut st, |st| st.events.len() == 1000);
    assert!(st
        .events
        .iter()
        .all(|e| *e == SerialEvent::Line(b"a=1".to_vec())));
}

#[test]
fn reads_writes_and_reconnects_on_a_real_pty() {
    let (master, path) = pty();
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("tty");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let source = SerialSource::new("t", &link, 9600).unwrap();
    let handle = source.handle();
    let mut ev: EventLoop<St> = EventLoop::try_new().unwrap();
    ev.handle()
        .insert_source(source, |e, _, st: &mut St| st.events.push(e))
        .unwrap();
    let mut st = St { events: vec![] };
    run_until(&mut ev, &mut st, |st| {
        st.events.contains(&SerialEvent::Connected)
    });
    let mut m = std::fs::File::from(master);
    m.write_all(b"t=1\n").unwrap();
    run_until(&mut ev, &mut st, |st| {
        st.events.contains(&SerialEvent::Line(b"t=1".to_vec()))
    });
    handle
        .write(b"HELLO\n".to_vec(), 7)
        .unwrap_or_else(|e| panic!("{e}: {:?}", st.events));
    run_until(&mut ev, &mut st, |st| {
        st.events.contains(&SerialEvent::WriteDone(7))
    });
    let mut buf = [0u8; 64];
    let n = nix::unistd::read(m.as_raw_fd(), &mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        b"HELLO\n",
        "serialport puts the tty in raw mode: bytes pass unchanged"
    );

    // Unplug: close the master. The source must notice and drop the port.
    drop(m);
    run_until(&mut ev, &mut st, |st| {
        st.events
            .iter()
            .any(|e| matches!(e, SerialEvent::Disconnected(_)))
    });
    assert_eq!(
        handle.write(b"x".to_vec(), 8),
        Err(WriteError::NotConnected)
    );
    // Plug back in: a new pty under the same path.
    let (master2, path2) = pty();
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&path2, &link).unwrap();
    st.events.clear();
    run_until(&mut ev, &mut st, |st| {
        st.events.contains(&SerialEvent::Connected)
    });
    let mut m2 = std::fs::File::from(master2);
    m2.write_all(b"t=2\n").unwrap();
    run_until(&mut ev, &mut st, |st| {
        st.events.contains(&SerialEvent::Line(b"t=2".to_vec()))
    });
}
