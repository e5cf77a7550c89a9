//! GPIO hardware: the [`GpioBackend`] trait, the types it speaks ([`Level`], [`Pull`],
//! [`Initial`], [`InputChange`]) and one module per backend.
//!
//! - [`cdev`] — the kernel's GPIO character device (`/dev/gpiochipN`, uAPI v2) via the
//!   `gpiocdev` crate: one line request per line, each request's fd a source in the loop. Any
//!   Pi under any kernel from Linux 5.10, and any other Linux board. The default.
//! - [`rppal`] — a Raspberry Pi's GPIO via the `rppal` crate: registers through
//!   `/dev/gpiomem` (Raspberry Pi OS kernels only), edge interrupts through `/dev/gpiochipN` on
//!   rppal's own thread, forwarded into a bounded `calloop::channel`.
//! - [`sim`] — simulated pins as files `gpio<N>` in a directory (`0`/`1` and a newline),
//!   watched with inotify. Any program can drive inputs (`echo 1 > gpio17`) and observe
//!   outputs (`cat gpio27`).
//!
//! This module depends on nothing else in the crate: the configuration is translated into
//! [`InputLine`]s and [`OutputLine`]s, and the loop-facing event source lives in
//! [`crate::sources::gpio`].
//!
//! # Levels are read, never assumed
//!
//! After a backend is opened, [`GpioBackend::read`] gives the level of every configured pin,
//! inputs and outputs alike. A pull-up input whose contact is closed at start reads
//! [`Level::Low`]; an output opened with [`Initial::Keep`] is not driven and reports the level
//! it already had (a relay need not drop when zgate restarts).
//!
//! # Permissions
//!
//! The user running zgate (the `zgate` service user of the `.deb`) needs read and write access
//! to the GPIO device files:
//!
//! - `/dev/gpiochipN` — the kernel's GPIO character devices: the `cdev` backend uses nothing
//!   else, and rppal requests input lines with edge detection through them. Raspberry Pi OS
//!   gives them to group `gpio`; Debian's kernel creates them `root:root 0600`, and the zgate
//!   package installs the udev rule below as `/usr/lib/udev/rules.d/60-zgate-gpio.rules`.
//! - `/dev/gpiomem` — rppal only: it maps the GPIO registers through it. Raspberry Pi OS gives
//!   it to the group `gpio` (mode 0660); Debian's stock kernel has no `/dev/gpiomem` at all, so
//!   rppal cannot work there.
//!
//! Add the user to the group and restart the service (group membership is read at login):
//!
//! ```text
//! sudo usermod -aG gpio zgate
//! sudo systemctl restart zgate
//! ```
//!
//! On a distribution without that setup, a udev rule does the same, e.g. in
//! `/etc/udev/rules.d/99-gpio.rules`:
//!
//! ```text
//! SUBSYSTEM=="bcm2835-gpiomem", GROUP="gpio", MODE="0660"
//! SUBSYSTEM=="gpio", KERNEL=="gpiochip*", GROUP="gpio", MODE="0660"
//! ```
//!
//! then `sudo udevadm control --reload && sudo udevadm trigger`. Running zgate as root also
//! works but throws away the service's hardening.
//!
//! # Troubleshooting
//!
//! Each failure is one [`HwError`] variant whose message names the cause and the fix:
//!
//! - [`HwError::PermissionDenied`]: see *Permissions* above; the message names the file.
//! - [`HwError::LineHeld`] (cdev): another program or kernel driver holds the line; the
//!   message names the consumer the kernel reports and the fix.
//! - [`HwError::ChipUnavailable`], [`HwError::NoHeaderChip`], [`HwError::AmbiguousHeaderChip`]
//!   (cdev): the chip named by `chip` cannot be opened, or `chip = "auto"` found no (or more
//!   than one) chip labelled like a Pi's 40-pin header; the message lists the chips.
//! - [`HwError::NoSuchLine`], [`HwError::LineNameNotUnique`], [`HwError::LineTwice`] (cdev): a
//!   `line` name is not on the chip, is on it twice, or lands on a line another entry uses.
//! - [`HwError::LineBusy`] (rppal): another program or kernel driver holds the line. `gpioinfo`
//!   (package `gpiod`) shows each line's consumer. Common holders: a second zgate, `gpiomon`,
//!   `pigpiod`, and device-tree overlays that claim pins (SPI0 on GPIO7–11, I2C1 on GPIO2–3,
//!   1-Wire on GPIO4, the UART on GPIO14–15). Stop the holder or disable the overlay in
//!   `/boot/firmware/config.txt`, or pick another pin.
//! - [`HwError::NoSuchPin`]: the board has no GPIO with that number. Pins are BCM numbers
//!   (GPIO17 is header pin 11), not header positions.
//! - [`HwError::Unavailable`]: the backend cannot run on this machine (rppal on something that
//!   is not a Raspberry Pi, or a kernel without `/dev/gpiomem`). Use `backend = "sim"` to test
//!   elsewhere.
//! - [`HwError::SimDir`], [`HwError::SimPin`], [`HwError::Inotify`]: the simulated backend's
//!   directory or files cannot be used; the message names the path.

pub mod cdev;
pub mod rppal;
pub mod sim;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

/// The electrical level of a pin. On the wire and in files it is `0` or `1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Level {
    /// Logic 0.
    #[default]
    Low,
    /// Logic 1.
    High,
}

impl std::ops::Not for Level {
    type Output = Level;
    fn not(self) -> Level {
        match self {
            Level::Low => Level::High,
            Level::High => Level::Low,
        }
    }
}

impl From<bool> for Level {
    fn from(high: bool) -> Level {
        if high {
            Level::High
        } else {
            Level::Low
        }
    }
}

impl From<Level> for bool {
    fn from(level: Level) -> bool {
        level == Level::High
    }
}

impl From<Level> for u8 {
    fn from(level: Level) -> u8 {
        match level {
            Level::Low => 0,
            Level::High => 1,
        }
    }
}

/// A number that is not a level (only 0 and 1 are).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not a level (0 or 1)")]
pub struct NotALevel(pub u64);

impl TryFrom<u8> for Level {
    type Error = NotALevel;
    fn try_from(n: u8) -> Result<Level, NotALevel> {
        Level::try_from(u64::from(n))
    }
}

impl TryFrom<u64> for Level {
    type Error = NotALevel;
    fn try_from(n: u64) -> Result<Level, NotALevel> {
        match n {
            0 => Ok(Level::Low),
            1 => Ok(Level::High),
            n => Err(NotALevel(n)),
        }
    }
}

impl fmt::Display for Level {
    /// `0` or `1`, as on the wire.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", u8::from(*self))
    }
}

impl Serialize for Level {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(u8::from(*self))
    }
}

impl<'de> Deserialize<'de> for Level {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Level, D::Error> {
        let n = u64::deserialize(d)?;
        Level::try_from(n).map_err(serde::de::Error::custom)
    }
}

/// The internal bias resistor of an input.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pull {
    /// Pull-up: an open contact reads High.
    Up,
    /// Pull-down: an open contact reads Low.
    Down,
    /// No bias: the line floats unless something drives it.
    #[default]
    None,
}

impl Pull {
    /// The level an unconnected input settles at with this bias (Low when floating).
    pub fn idle_level(self) -> Level {
        Level::from(self == Pull::Up)
    }
}

/// What an output does when zgate opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initial {
    /// Drive this level.
    Drive(Level),
    /// Drive nothing new: the output keeps the level it has, which is read and reported.
    Keep,
}

impl Default for Initial {
    fn default() -> Self {
        Initial::Drive(Level::Low)
    }
}

impl fmt::Display for Initial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Initial::Drive(level) => write!(f, "{level}"),
            Initial::Keep => f.write_str("keep"),
        }
    }
}

impl<'de> Deserialize<'de> for Initial {
    /// `0`, `1` or `"keep"`.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Initial, D::Error> {
        struct V;
        const EXPECTED: &str = "0, 1 or \"keep\"";
        impl serde::de::Visitor<'_> for V {
            type Value = Initial;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Initial, E> {
                Level::try_from(n)
                    .map(Initial::Drive)
                    .map_err(|_| E::custom(format!("{n} is not {EXPECTED}")))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Initial, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom(format!("{n} is not {EXPECTED}"))),
                }
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Initial, E> {
                match s {
                    "keep" => Ok(Initial::Keep),
                    _ => Err(E::custom(format!("{s:?} is not {EXPECTED}"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A configured input line, as a backend needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLine {
    /// BCM number (the line offset on a Pi's GPIO chip).
    pub pin: u8,
    /// Bias resistor.
    pub pull: Pull,
    /// Debounce period for backends that filter in hardware or in their driver; zero = none.
    pub debounce: Duration,
}

/// A configured output line, as a backend needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLine {
    /// BCM number.
    pub pin: u8,
    /// What to drive at open.
    pub initial: Initial,
}

/// An input pin changed to `level`. Backends report every change they see; the gateway
/// debounces and filters by the configured edge setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputChange {
    /// BCM number of the input.
    pub pin: u8,
    /// The level it changed to.
    pub level: Level,
}

/// An error of a GPIO backend. Each variant says the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum HwError {
    /// The process may not open a GPIO device file.
    #[error(
        "permission denied on {path}: the user running zgate needs read/write access to it. \
         Add the user to the `gpio` group (`sudo usermod -aG gpio zgate`, then restart zgate), \
         or give group `gpio` mode 0660 on it with a udev rule (`SUBSYSTEM==\"gpio\", \
         KERNEL==\"gpiochip*\", GROUP=\"gpio\", MODE=\"0660\"`)"
    )]
    PermissionDenied {
        /// The device file that could not be opened.
        path: String,
    },
    /// Another program or kernel driver holds the line.
    #[error(
        "GPIO{pin} is busy: {detail}. Another program or driver holds the line \
         (`gpioinfo` names the consumer: a second zgate, gpiomon, pigpiod, or an overlay such \
         as SPI0 on GPIO7-11, I2C1 on GPIO2-3, 1-Wire on GPIO4); stop it, disable the overlay \
         in /boot/firmware/config.txt, or use another pin"
    )]
    LineBusy {
        /// BCM number of the line.
        pin: u8,
        /// What the backend reported.
        detail: String,
    },
    /// The board has no GPIO with this number.
    #[error(
        "GPIO{pin} does not exist on this board: pins are BCM numbers (GPIO17 is header pin \
         11), not header positions; fix `pin` in the [gpio] section"
    )]
    NoSuchPin {
        /// The BCM number asked for.
        pin: u8,
    },
    /// The backend cannot run on this machine.
    #[error(
        "GPIO backend \"{backend}\" is unavailable on this machine: {reason}. It needs a \
         Raspberry Pi running Raspberry Pi OS (/dev/gpiomem); to test elsewhere set \
         [gpio] backend = \"sim\""
    )]
    Unavailable {
        /// Configured backend name.
        backend: &'static str,
        /// What failed.
        reason: String,
    },
    /// Any other I/O error of a hardware backend.
    #[error("GPIO{pin}: {op} failed: {source}")]
    Io {
        /// BCM number of the line.
        pin: u8,
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The simulated backend's directory cannot be used.
    #[error("cannot use the simulated GPIO directory {path}: {source} (create it, or set gpio.sim_dir to a directory the user running zgate can write)")]
    SimDir {
        /// The directory.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A simulated pin file cannot be read or written, or holds something other than 0 or 1.
    #[error("simulated pin file {path}: {source} (it must hold 0 or 1 and be readable and writable by the user running zgate; delete it to have it created again)")]
    SimPin {
        /// The pin file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// inotify could not be set up for the simulated backend.
    #[error("cannot watch {path} with inotify: {source} (raise fs.inotify.max_user_instances/max_user_watches)")]
    Inotify {
        /// The watched directory.
        path: String,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The GPIO chip device cannot be opened or asked for its lines.
    #[error(
        "cannot use the GPIO chip {path}: {reason}. `ls /dev/gpiochip*` or `gpiodetect` \
         (package gpiod) lists the chips; set [gpio] chip to one of them or to \"auto\" (the \
         Raspberry Pi's header chip); the kernel needs the GPIO character device (Linux 5.10 \
         or later); to test without hardware set [gpio] backend = \"sim\""
    )]
    ChipUnavailable {
        /// The chip device (or `/dev` when the chips could not be listed).
        path: String,
        /// What failed.
        reason: String,
    },
    /// `chip = "auto"` found no chip with the label of a Raspberry Pi's 40-pin header.
    #[error(
        "no GPIO chip of a Raspberry Pi's 40-pin header found (a chip labelled \
         pinctrl-bcm2835 on a Pi 1-3 or Zero, pinctrl-bcm2711 on a Pi 4, pinctrl-rp1 on a \
         Pi 5); chips here: {chips}. On another board set [gpio] chip = \"/dev/gpiochipN\" \
         (`gpiodetect` lists chips and labels); to test without hardware set [gpio] \
         backend = \"sim\""
    )]
    NoHeaderChip {
        /// The chips seen, with label and line count.
        chips: String,
    },
    /// `chip = "auto"` found more than one chip with a header label.
    #[error(
        "more than one GPIO chip looks like the 40-pin header: {chips}; set [gpio] chip to \
         the one to use, e.g. chip = \"/dev/gpiochip0\""
    )]
    AmbiguousHeaderChip {
        /// The matching chips.
        chips: String,
    },
    /// No line of the chip has the configured `line` name.
    #[error(
        "no GPIO line named {name:?} on {chip}: `gpioinfo` (package gpiod) lists each line's \
         name (names are case-sensitive, e.g. \"GPIO17\"); fix `line` in the [gpio] section \
         or give the line's offset with `pin` instead"
    )]
    NoSuchLine {
        /// The name looked up.
        name: String,
        /// The chip searched.
        chip: String,
    },
    /// More than one line of the chip has the configured `line` name.
    #[error(
        "GPIO line name {name:?} is not unique on {chip} (offsets {offsets}): give the \
         offset with `pin` instead of `line`"
    )]
    LineNameNotUnique {
        /// The name looked up.
        name: String,
        /// The chip searched.
        chip: String,
        /// Offsets carrying that name.
        offsets: String,
    },
    /// The kernel refused the line request because the line is held (EBUSY).
    #[error(
        "GPIO line {pin} ({name}) of {chip} is held by consumer {consumer:?}. Stop the program \
         that holds it (a second zgate, gpiomon, gpioset, pigpiod), or, if it is a kernel \
         driver, turn off the overlay that claims the pin in /boot/firmware/config.txt (SPI0 \
         chip selects on GPIO7-8 and SPI0 on GPIO9-11: dtparam=spi=off; I2C1 on GPIO2-3; \
         1-Wire on GPIO4; the UART on GPIO14-15) and reboot, or use another pin"
    )]
    LineHeld {
        /// Offset of the line (the BCM number on a Pi).
        pin: u8,
        /// The line's name, "unnamed" when it has none.
        name: String,
        /// The chip device.
        chip: String,
        /// The consumer holding it, from the kernel's line info.
        consumer: String,
    },
    /// Two configured entries are the same line (a `line` name found at an offset that
    /// another entry uses).
    #[error(
        "GPIO line {pin} is configured twice: by {first:?} and by {second:?} (a `line` name \
         resolves to an offset another entry uses); each line may be used once: fix `pin` or \
         `line` in the [gpio] section"
    )]
    LineTwice {
        /// The offset.
        pin: u8,
        /// Name of the first entry on it.
        first: String,
        /// Name of the second entry on it.
        second: String,
    },
    /// An entry given by `line` was opened before its name was looked up on the chip.
    #[error(
        "GPIO line {name:?} was not looked up on the chip before the GPIO was opened \
         (a program error: call sources::gpio::resolve_lines first)"
    )]
    LineNotResolved {
        /// The line name.
        name: String,
    },
    /// A pin was used that is not configured as the kind of line the call needs.
    #[error("GPIO{pin} is not configured as {expected}")]
    NotConfigured {
        /// BCM number.
        pin: u8,
        /// "an output" or "an input or output".
        expected: &'static str,
    },
}

impl HwError {
    /// Maps an I/O error of `backend`'s device operation on `pin`: EACCES/EPERM, EBUSY, ENOENT/ENODEV/ENXIO
    /// and EINVAL (an offset the chip does not have) become their own variants.
    pub fn from_io(
        backend: &'static str,
        pin: u8,
        path: &str,
        op: &'static str,
        source: std::io::Error,
    ) -> HwError {
        match source.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => HwError::PermissionDenied {
                path: path.to_string(),
            },
            Some(libc::EBUSY) => HwError::LineBusy {
                pin,
                detail: format!("{op}: {source}"),
            },
            Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => HwError::Unavailable {
                backend,
                reason: format!("{path}: {source}"),
            },
            Some(libc::EINVAL) => HwError::NoSuchPin { pin },
            _ => HwError::Io { pin, op, source },
        }
    }
}

/// Output and input access for configured pins. Implemented by each backend; input changes
/// arrive through the backend's event source (see [`crate::sources::gpio`]).
pub trait GpioBackend {
    /// Drives the output `pin` to `level`.
    fn write(&mut self, pin: u8, level: Level) -> Result<(), HwError>;
    /// Reads the current level of a configured pin: an input's level, or the level an output
    /// has (whether zgate drove it or it was kept from before).
    fn read(&mut self, pin: u8) -> Result<Level, HwError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_conversions() {
        assert_eq!(!Level::Low, Level::High);
        assert_eq!(!Level::High, Level::Low);
        assert_eq!(Level::from(true), Level::High);
        assert_eq!(Level::from(false), Level::Low);
        assert!(bool::from(Level::High));
        assert_eq!(u8::from(Level::High), 1);
        assert_eq!(u8::from(Level::Low), 0);
        assert_eq!(Level::try_from(1u8), Ok(Level::High));
        assert_eq!(Level::try_from(0u8), Ok(Level::Low));
        assert_eq!(Level::try_from(2u8), Err(NotALevel(2)));
        assert_eq!(Level::High.to_string(), "1");
        assert_eq!(serde_json::to_string(&Level::Low).unwrap(), "0");
        assert_eq!(serde_json::from_str::<Level>("1").unwrap(), Level::High);
        assert!(serde_json::from_str::<Level>("2").is_err());
    }

    #[test]
    fn initial_accepts_0_1_keep_only() {
        #[derive(Deserialize)]
        struct T {
            initial: Initial,
        }
        let p = |s: &str| toml::from_str::<T>(&format!("initial = {s}")).map(|t| t.initial);
        assert_eq!(p("0").unwrap(), Initial::Drive(Level::Low));
        assert_eq!(p("1").unwrap(), Initial::Drive(Level::High));
        assert_eq!(p("\"keep\"").unwrap(), Initial::Keep);
        for bad in ["2", "-1", "\"on\"", "true"] {
            let e = p(bad).unwrap_err().to_string();
            assert!(e.contains("0, 1 or \"keep\""), "{bad}: {e}");
        }
    }

    #[test]
    fn io_errors_map_to_their_cause() {
        let e = |errno| std::io::Error::from_raw_os_error(errno);
        let m = |errno| HwError::from_io("rppal", 17, "/dev/gpiochip0", "request line", e(errno));
        assert!(
            matches!(m(libc::EACCES), HwError::PermissionDenied { path } if path == "/dev/gpiochip0")
        );
        assert!(matches!(m(libc::EPERM), HwError::PermissionDenied { .. }));
        assert!(matches!(m(libc::EBUSY), HwError::LineBusy { pin: 17, .. }));
        assert!(matches!(m(libc::EINVAL), HwError::NoSuchPin { pin: 17 }));
        assert!(matches!(m(libc::ENOENT), HwError::Unavailable { .. }));
        assert!(matches!(m(libc::EIO), HwError::Io { pin: 17, .. }));
        let busy = m(libc::EBUSY).to_string();
        assert!(
            busy.contains("GPIO17 is busy") && busy.contains("gpioinfo"),
            "{busy}"
        );
        let denied = m(libc::EACCES).to_string();
        assert!(
            denied.contains("/dev/gpiochip0") && denied.contains("gpio"),
            "{denied}"
        );
    }
}
