//! Framing the bytes of a serial port into lines.

use super::SerialEvent;
use crate::config::InputLineEnding;
use crate::protocol::MAX_LINE;

/// Splits the bytes of a port into lines (see [`InputLineEnding`]). Lines longer than
/// [`MAX_LINE`] are dropped whole and reported once; empty lines are skipped (so in `auto`
/// mode the LF of a CR LF, even in a later read, ends nothing).
pub struct LineFramer {
    ending: InputLineEnding,
    line: Vec<u8>,
    /// Bytes discarded of the current overlong line (0 when not discarding).
    discarding: usize,
    /// The last byte taken was a CR (for `crlf` when the LF comes in the next read).
    prev_cr: bool,
}

impl LineFramer {
    /// A framer with nothing buffered.
    pub fn new(ending: InputLineEnding) -> LineFramer {
        LineFramer {
            ending,
            line: Vec::with_capacity(256),
            discarding: 0,
            prev_cr: false,
        }
    }

    /// Forgets a partial line (the port was reopened).
    pub fn reset(&mut self) {
        self.line.clear();
        self.discarding = 0;
        self.prev_cr = false;
    }

    /// Where the next line ends in `bytes`: the index of its terminating byte.
    fn next_end(&self, bytes: &[u8]) -> Option<usize> {
        match self.ending {
            InputLineEnding::Lf => bytes.iter().position(|&b| b == b'\n'),
            InputLineEnding::Cr => bytes.iter().position(|&b| b == b'\r'),
            InputLineEnding::Auto => bytes.iter().position(|&b| b == b'\n' || b == b'\r'),
            InputLineEnding::Crlf => {
                let mut from = 0;
                loop {
                    let i = from + bytes[from..].iter().position(|&b| b == b'\n')?;
                    let after_cr = if i == 0 {
                        self.prev_cr
                    } else {
                        bytes[i - 1] == b'\r'
                    };
                    if after_cr {
                        return Some(i);
                    }
                    from = i + 1;
                }
            }
        }
    }

    /// Frames `bytes`, calling `emit` with each complete line or overlong report.
    pub fn push(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(SerialEvent)) {
        // In lf and crlf modes a CR before the LF is part of the ending, not of the line.
        let strip_cr = matches!(self.ending, InputLineEnding::Lf | InputLineEnding::Crlf);
        while !bytes.is_empty() {
            let Some(i) = self.next_end(bytes) else {
                if self.discarding > 0 {
                    self.discarding += bytes.len();
                } else if self.line.len() + bytes.len() > MAX_LINE + 1 {
                    self.discarding = self.line.len() + bytes.len();
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(bytes);
                }
                self.prev_cr = bytes.last() == Some(&b'\r');
                return;
            };
            let (head, rest) = bytes.split_at(i);
            self.prev_cr = rest[0] == b'\r';
            bytes = &rest[1..];
            if self.discarding > 0 {
                let dropped = self.discarding + head.len();
                self.discarding = 0;
                emit(SerialEvent::Overlong(dropped));
                continue;
            }
            // One byte of slack for a CR that is part of the ending.
            if self.line.len() + head.len() > MAX_LINE + 1 {
                let dropped = self.line.len() + head.len();
                self.line.clear();
                emit(SerialEvent::Overlong(dropped));
                continue;
            }
            self.line.extend_from_slice(head);
            if strip_cr && self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            if self.line.len() > MAX_LINE {
                let dropped = self.line.len();
                self.line.clear();
                emit(SerialEvent::Overlong(dropped));
            } else if !self.line.is_empty() {
                let line = std::mem::replace(&mut self.line, Vec::with_capacity(256));
                emit(SerialEvent::Line(line));
            }
        }
    }

    /// Changes which bytes end a line from now on; a partial line is kept.
    pub fn set_ending(&mut self, ending: InputLineEnding) {
        self.ending = ending;
    }
}
