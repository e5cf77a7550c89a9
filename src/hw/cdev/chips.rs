//! Finding the chip and the lines: chip selection by label, line lookup by name, and the
//! errors that name what holds a line. The deciding parts are pure functions over what the
//! kernel reported ([`ChipProbe`], [`LineSummary`]), tested without a chip.

use super::HwError;
use gpiocdev::Chip;
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Labels of the chips that carry a Raspberry Pi's 40-pin header: Pi 1–3 and Zero, Pi 4 and
/// Pi 400, Pi 5. On all of them line offset N is BCM GPIO N.
pub const HEADER_CHIP_LABELS: [&str; 3] = ["pinctrl-bcm2835", "pinctrl-bcm2711", "pinctrl-rp1"];

/// Which GPIO chip to use (`[gpio] chip`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ChipSelect {
    /// The chip of the 40-pin header, found by its label (`"auto"`).
    #[default]
    Auto,
    /// This chip device, e.g. `/dev/gpiochip0`.
    Path(PathBuf),
}

impl fmt::Display for ChipSelect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChipSelect::Auto => f.write_str("auto"),
            ChipSelect::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

impl<'de> Deserialize<'de> for ChipSelect {
    /// `"auto"` or a path; whether the path is usable is checked by the config validation.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ChipSelect, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "auto" => ChipSelect::Auto,
            _ => ChipSelect::Path(PathBuf::from(s)),
        })
    }
}

/// What probing one chip device gave: its label and line count, or the errno of the failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChipProbe {
    /// The device file.
    pub path: PathBuf,
    /// `(label, number of lines)`, or the errno that opening or asking it gave.
    pub info: Result<(String, u32), i32>,
}

/// Picks the chip of the 40-pin header among `chips`: the one whose label is in
/// [`HEADER_CHIP_LABELS`]. None → [`HwError::NoHeaderChip`] (or [`HwError::PermissionDenied`]
/// when a chip could not be opened for lack of permission, since that one may be it); more
/// than one → [`HwError::AmbiguousHeaderChip`].
pub fn select_header_chip(chips: &[ChipProbe]) -> Result<&ChipProbe, HwError> {
    let matching: Vec<&ChipProbe> = chips
        .iter()
        .filter(
            |c| matches!(&c.info, Ok((label, _)) if HEADER_CHIP_LABELS.contains(&label.as_str())),
        )
        .collect();
    let list = |chips: &mut dyn Iterator<Item = &ChipProbe>| -> String {
        let items: Vec<String> = chips
            .map(|c| match &c.info {
                Ok((label, n)) => format!("{} [{label}] ({n} lines)", c.path.display()),
                Err(errno) => format!(
                    "{} (cannot open: {})",
                    c.path.display(),
                    io::Error::from_raw_os_error(*errno)
                ),
            })
            .collect();
        if items.is_empty() {
            "none".into()
        } else {
            items.join(", ")
        }
    };
    match matching.as_slice() {
        [one] => Ok(one),
        [] => {
            let denied = chips
                .iter()
                .find(|c| matches!(c.info, Err(e) if e == libc::EACCES || e == libc::EPERM));
            match denied {
                Some(c) => Err(HwError::PermissionDenied {
                    path: c.path.display().to_string(),
                }),
                None => Err(HwError::NoHeaderChip {
                    chips: list(&mut chips.iter()),
                }),
            }
        }
        many => Err(HwError::AmbiguousHeaderChip {
            chips: list(&mut many.iter().copied()),
        }),
    }
}

/// What the kernel says about one line of a chip (the part zgate uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineSummary {
    /// Offset on the chip.
    pub offset: u32,
    /// The line's name (from the device tree), empty when it has none.
    pub name: String,
    /// Who holds the line, empty when nobody or unnamed.
    pub consumer: String,
    /// Whether the line is held (requested by a program or claimed by a kernel driver).
    pub used: bool,
}

impl From<gpiocdev::line::Info> for LineSummary {
    fn from(i: gpiocdev::line::Info) -> LineSummary {
        LineSummary {
            offset: i.offset,
            name: i.name,
            consumer: i.consumer,
            used: i.used,
        }
    }
}

/// The offset of the line called `name` among `lines` (exact, case-sensitive match), which
/// must be unique and fit a `u8`.
pub fn find_line(lines: &[LineSummary], name: &str, chip: &Path) -> Result<u8, HwError> {
    let mut found = lines.iter().filter(|l| l.name == name);
    let chip_s = chip.display().to_string();
    let Some(first) = found.next() else {
        return Err(HwError::NoSuchLine {
            name: name.into(),
            chip: chip_s,
        });
    };
    if let Some(second) = found.next() {
        return Err(HwError::LineNameNotUnique {
            name: name.into(),
            chip: chip_s,
            offsets: format!("{} and {}", first.offset, second.offset),
        });
    }
    u8::try_from(first.offset).map_err(|_| HwError::NoSuchLine {
        name: format!("{name} (offset {} is above 255)", first.offset),
        chip: chip_s,
    })
}

/// The error for a request of `pin` that the kernel refused with EBUSY, naming the holder
/// from the line's info (`line`, when it could be read).
pub fn busy_error(chip: &Path, pin: u8, line: Option<&LineSummary>) -> HwError {
    let (name, consumer) = match line {
        Some(l) => (l.name.clone(), l.consumer.clone()),
        None => (String::new(), String::new()),
    };
    HwError::LineHeld {
        pin,
        name: if name.is_empty() {
            "unnamed".into()
        } else {
            name
        },
        chip: chip.display().to_string(),
        consumer: if consumer.is_empty() {
            "unknown (no consumer name)".into()
        } else {
            consumer
        },
    }
}

/// The errno inside a gpiocdev error, if it carries one.
pub fn errno_of(e: &gpiocdev::Error) -> Option<i32> {
    match e {
        gpiocdev::Error::Os(gpiocdev_uapi::Errno(n)) => Some(*n),
        gpiocdev::Error::Uapi(_, gpiocdev_uapi::Error::Os(gpiocdev_uapi::Errno(n))) => Some(*n),
        _ => None,
    }
}

pub(super) fn chip_error(path: &Path, e: &gpiocdev::Error) -> HwError {
    match errno_of(e) {
        Some(libc::EACCES) | Some(libc::EPERM) => HwError::PermissionDenied {
            path: path.display().to_string(),
        },
        _ => HwError::ChipUnavailable {
            path: path.display().to_string(),
            reason: e.to_string(),
        },
    }
}

/// Opens the chip device at `path` and asks for its label and line count.
pub fn probe(path: &Path) -> ChipProbe {
    let info = Chip::from_path(path)
        .and_then(|c| c.info())
        .map(|i| (i.label, i.num_lines))
        .map_err(|e| errno_of(&e).unwrap_or(libc::EIO));
    ChipProbe {
        path: path.to_path_buf(),
        info,
    }
}

/// Opens the chip `select` names and returns it with its label.
pub(super) fn open_chip(select: &ChipSelect) -> Result<(Chip, String), HwError> {
    let path = match select {
        ChipSelect::Path(p) => p.clone(),
        ChipSelect::Auto => {
            let paths = gpiocdev::chip::chips().map_err(|e| chip_error(Path::new("/dev"), &e))?;
            let probes: Vec<ChipProbe> = paths.iter().map(|p| probe(p)).collect();
            select_header_chip(&probes)?.path.clone()
        }
    };
    let chip = Chip::from_path(&path).map_err(|e| chip_error(&path, &e))?;
    let info = chip.info().map_err(|e| chip_error(&path, &e))?;
    Ok((chip, info.label))
}

pub(super) fn line_summaries(chip: &Chip) -> Result<Vec<LineSummary>, HwError> {
    let iter = chip
        .line_info_iter()
        .map_err(|e| chip_error(chip.path(), &e))?;
    iter.map(|r| r.map(LineSummary::from))
        .collect::<Result<_, _>>()
        .map_err(|e| chip_error(chip.path(), &e))
}

/// Looks up `names` on the chip `select` names: their offsets, in order.
pub fn resolve_names(select: &ChipSelect, names: &[&str]) -> Result<Vec<u8>, HwError> {
    let (chip, _) = open_chip(select)?;
    let lines = line_summaries(&chip)?;
    names
        .iter()
        .map(|n| find_line(&lines, n, chip.path()))
        .collect()
}
