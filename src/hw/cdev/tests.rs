//! Tests of the cdev backend that need no GPIO chip: chip selection, line lookup, error
//! messages, and failures to open a chip that is not there. `driven_output_reads_back` drives
//! a real chip when one is named (ignored by default).

use super::*;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn chip(path: &str, label: &str, lines: u32) -> ChipProbe {
    ChipProbe {
        path: PathBuf::from(path),
        info: Ok((label.into(), lines)),
    }
}

fn line(offset: u32, name: &str, consumer: &str) -> LineSummary {
    LineSummary {
        offset,
        name: name.into(),
        consumer: consumer.into(),
        used: !consumer.is_empty(),
    }
}

/// The header chip is found by label wherever it is numbered: a Pi 5 before Linux 6.6.45
/// (RP1 at gpiochip4, after the SoC's own chips) and after (RP1 at gpiochip0), a Pi 4, a Pi 3.
#[test]
fn header_chip_is_found_by_label_not_number() {
    let pi5_old = [
        chip("/dev/gpiochip0", "gpio-brcmstb@107d508500", 32),
        chip("/dev/gpiochip1", "gpio-brcmstb@107d508520", 4),
        chip("/dev/gpiochip2", "gpio-brcmstb@107d517c00", 17),
        chip("/dev/gpiochip3", "gpio-brcmstb@107d517c20", 6),
        chip("/dev/gpiochip4", "pinctrl-rp1", 54),
    ];
    assert_eq!(
        select_header_chip(&pi5_old).unwrap().path,
        Path::new("/dev/gpiochip4")
    );
    let pi5_new = [
        chip("/dev/gpiochip0", "pinctrl-rp1", 54),
        chip("/dev/gpiochip10", "gpio-brcmstb@107d508500", 32),
    ];
    assert_eq!(
        select_header_chip(&pi5_new).unwrap().path,
        Path::new("/dev/gpiochip0")
    );
    let pi4 = [
        chip("/dev/gpiochip0", "pinctrl-bcm2711", 58),
        chip("/dev/gpiochip1", "raspberrypi-exp-gpio", 8),
    ];
    assert_eq!(
        select_header_chip(&pi4).unwrap().path,
        Path::new("/dev/gpiochip0")
    );
    let pi3 = [
        chip("/dev/gpiochip0", "raspberrypi-exp-gpio", 8),
        chip("/dev/gpiochip1", "pinctrl-bcm2835", 54),
    ];
    assert_eq!(
        select_header_chip(&pi3).unwrap().path,
        Path::new("/dev/gpiochip1")
    );
}

/// No header chip: the error lists what is there and says how to pick one; no chip at all
/// says "none".
#[test]
fn no_header_chip_lists_the_chips_and_the_fix() {
    let pc = [
        chip("/dev/gpiochip0", "INT34C6:00", 463),
        ChipProbe {
            path: PathBuf::from("/dev/gpiochip1"),
            info: Err(libc::ENODEV),
        },
    ];
    let e = select_header_chip(&pc).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, HwError::NoHeaderChip { .. }), "{msg}");
    for want in [
        "/dev/gpiochip0 [INT34C6:00] (463 lines)",
        "/dev/gpiochip1 (cannot open",
        "pinctrl-bcm2835",
        "pinctrl-bcm2711",
        "pinctrl-rp1",
        "chip = \"/dev/gpiochipN\"",
        "backend = \"sim\"",
    ] {
        assert!(msg.contains(want), "{want:?} not in {msg}");
    }
    let none = select_header_chip(&[]).unwrap_err().to_string();
    assert!(none.contains("chips here: none"), "{none}");
}

/// A chip that cannot be opened for lack of permission may be the header chip: the error is
/// the permission problem, naming the file.
#[test]
fn unreadable_chip_is_a_permission_error() {
    let chips = [
        ChipProbe {
            path: PathBuf::from("/dev/gpiochip0"),
            info: Err(libc::EACCES),
        },
        chip("/dev/gpiochip1", "raspberrypi-exp-gpio", 8),
    ];
    let e = select_header_chip(&chips).unwrap_err();
    assert!(
        matches!(&e, HwError::PermissionDenied { path } if path == "/dev/gpiochip0"),
        "{e}"
    );
    assert!(e.to_string().contains("gpio"), "{e}");
}

#[test]
fn two_header_chips_are_ambiguous() {
    let chips = [
        chip("/dev/gpiochip0", "pinctrl-bcm2835", 54),
        chip("/dev/gpiochip2", "pinctrl-rp1", 54),
    ];
    let e = select_header_chip(&chips).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, HwError::AmbiguousHeaderChip { .. }), "{msg}");
    assert!(
        msg.contains("/dev/gpiochip0") && msg.contains("/dev/gpiochip2"),
        "{msg}"
    );
}

/// Names are found exactly; a missing or repeated name is a clear error.
#[test]
fn line_names_are_looked_up_exactly() {
    let lines = [
        line(0, "ID_SDA", ""),
        line(17, "GPIO17", ""),
        line(18, "GPIO18", "gpio-fan"),
        line(40, "dup", ""),
        line(41, "dup", ""),
        line(300, "FAR", ""),
    ];
    let chip = Path::new("/dev/gpiochip0");
    assert_eq!(find_line(&lines, "GPIO17", chip).unwrap(), 17);
    assert_eq!(find_line(&lines, "GPIO18", chip).unwrap(), 18);
    let e = find_line(&lines, "gpio17", chip).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, HwError::NoSuchLine { .. }), "{msg}");
    assert!(
        msg.contains("\"gpio17\"") && msg.contains("/dev/gpiochip0") && msg.contains("gpioinfo"),
        "{msg}"
    );
    let e = find_line(&lines, "dup", chip).unwrap_err();
    assert!(
        matches!(&e, HwError::LineNameNotUnique { offsets, .. } if offsets == "40 and 41"),
        "{e}"
    );
    assert!(matches!(
        find_line(&lines, "FAR", chip),
        Err(HwError::NoSuchLine { .. })
    ));
}

/// EBUSY names the line, the consumer from the line info, the chip and the fix (SPI0's chip
/// selects are GPIO7/8 when SPI is on).
#[test]
fn busy_line_names_its_consumer_and_the_fix() {
    let held = line(8, "SPI_CE0_N", "spi0 CS0");
    let e = busy_error(Path::new("/dev/gpiochip0"), 8, Some(&held));
    let msg = e.to_string();
    for want in [
        "GPIO line 8 (SPI_CE0_N)",
        "/dev/gpiochip0",
        "consumer \"spi0 CS0\"",
        "dtparam=spi=off",
        "use another pin",
    ] {
        assert!(msg.contains(want), "{want:?} not in {msg}");
    }
    let unknown = busy_error(Path::new("/dev/gpiochip0"), 5, None).to_string();
    assert!(
        unknown.contains("(unnamed)") && unknown.contains("unknown (no consumer name)"),
        "{unknown}"
    );
}

#[test]
fn errno_is_found_in_gpiocdev_errors() {
    let busy = gpiocdev::Error::Uapi(
        gpiocdev::UapiCall::GetLine,
        gpiocdev_uapi::Error::Os(gpiocdev_uapi::Errno(libc::EBUSY)),
    );
    assert_eq!(errno_of(&busy), Some(libc::EBUSY));
    let enoent = gpiocdev::Error::from(io::Error::from_raw_os_error(libc::ENOENT));
    assert_eq!(errno_of(&enoent), Some(libc::ENOENT));
    assert_eq!(
        errno_of(&gpiocdev::Error::InvalidArgument("x".into())),
        None
    );
}

#[test]
fn chip_select_parses_auto_or_path() {
    #[derive(Deserialize)]
    struct T {
        chip: ChipSelect,
    }
    let p = |s: &str| toml::from_str::<T>(&format!("chip = {s}")).map(|t| t.chip);
    assert_eq!(p("\"auto\"").unwrap(), ChipSelect::Auto);
    assert_eq!(
        p("\"/dev/gpiochip0\"").unwrap(),
        ChipSelect::Path(PathBuf::from("/dev/gpiochip0"))
    );
    assert!(p("0").is_err());
}

fn output(pin: u8) -> OutputLine {
    OutputLine {
        pin,
        initial: Initial::Drive(Level::Low),
    }
}

/// Opening a chip path that does not exist, or a file that is not a GPIO chip, is an error
/// naming the path (never a panic).
#[test]
fn opening_a_missing_or_wrong_chip_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("gpiochip0");
    let file = dir.path().join("plain");
    std::fs::write(&file, "x").unwrap();
    let mut cases = vec![
        (missing, "No such file"),
        (file, "not a character device"),
        (PathBuf::from("/dev/null"), "not a GPIO character device"),
    ];
    // The machine's own /dev/gpiochip0, when it has none.
    if !Path::new("/dev/gpiochip0").exists() {
        cases.push((PathBuf::from("/dev/gpiochip0"), "No such file"));
    }
    for (path, why) in cases {
        let e = CdevGpio::open(&ChipSelect::Path(path.clone()), &[], &[output(27)])
            .err()
            .expect("open must fail");
        let msg = e.to_string();
        assert!(matches!(e, HwError::ChipUnavailable { .. }), "{msg}");
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(why),
            "{why:?} / path not in {msg}"
        );
    }
}

/// `chip = "auto"` on a machine without a header chip fails with the list of chips.
#[test]
fn auto_without_a_header_chip_fails_clearly() {
    let here: Vec<ChipProbe> = gpiocdev::chip::chips()
        .unwrap_or_default()
        .iter()
        .map(|p| probe(p))
        .collect();
    if select_header_chip(&here).is_ok() {
        eprintln!("this machine has a Raspberry Pi header chip; nothing to check");
        return;
    }
    let inputs = [InputLine {
        pin: 17,
        pull: Pull::Up,
        debounce: Duration::from_millis(20),
    }];
    let e = CdevGpio::open(&ChipSelect::Auto, &inputs, &[])
        .err()
        .expect("open must fail");
    assert!(
        matches!(
            e,
            HwError::NoHeaderChip { .. } | HwError::PermissionDenied { .. }
        ),
        "{e}"
    );
}

/// Drives a real chip: `ZGATE_CDEV_CHIP=/dev/gpiochipN ZGATE_CDEV_PIN=N cargo test --lib
/// driven_output_reads_back -- --ignored`. The line is driven high, then low: nothing may be
/// connected to it that minds.
#[test]
#[ignore = "needs a GPIO chip: set ZGATE_CDEV_CHIP and ZGATE_CDEV_PIN"]
fn driven_output_reads_back() {
    let chip = std::env::var("ZGATE_CDEV_CHIP").expect("ZGATE_CDEV_CHIP");
    let pin: u8 = std::env::var("ZGATE_CDEV_PIN")
        .expect("ZGATE_CDEV_PIN")
        .parse()
        .unwrap();
    let (mut gpio, events) =
        CdevGpio::open(&ChipSelect::Path(chip.into()), &[], &[output(pin)]).unwrap();
    assert!(events.lines.is_empty());
    assert_eq!(gpio.read(pin).unwrap(), Level::Low);
    gpio.write(pin, Level::High).unwrap();
    assert_eq!(gpio.read(pin).unwrap(), Level::High);
    gpio.write(pin, Level::Low).unwrap();
    assert_eq!(gpio.read(pin).unwrap(), Level::Low);
}

/// A gap in the kernel's per-line edge numbers (including across wrap-around) means lost
/// edges; the first edge seen and consecutive ones do not.
#[test]
fn lost_edges_are_seen_in_sequence_numbers() {
    assert!(!edges_lost(None, 7));
    assert!(!edges_lost(Some(1), 2));
    assert!(!edges_lost(Some(u32::MAX), 0));
    assert!(edges_lost(Some(1), 3));
    assert!(edges_lost(Some(5), 5));
}
