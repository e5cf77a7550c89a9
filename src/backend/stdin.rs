//! Complete lines from stdin for the reference backend's poll loop.
//!
//! The loop polls the raw fd and does one `read` per wake (the fd said it is readable, so the
//! read does not block; stdin is never switched to non-blocking mode, which would change the
//! terminal or pipe it shares with the parent). Everything that read returned is split into
//! lines at once: several lines piped in one write all come out of the same wake, none waits
//! for more input.

/// The longest line kept; a longer one is discarded (reported once) up to its newline.
pub const MAX_LINE: usize = 1 << 20;

/// Splits bytes into lines, keeping an unfinished line until its newline (bounded by
/// [`MAX_LINE`]).
#[derive(Debug, Default)]
pub struct LineReader {
    partial: Vec<u8>,
    /// Inside an over-long line: drop bytes up to the next newline.
    discarding: bool,
}

impl LineReader {
    /// Takes the bytes of one read; returns every line they complete, in order (without the
    /// newline), or the problem with a line that cannot be used.
    pub fn feed(&mut self, mut data: &[u8]) -> Vec<Result<String, String>> {
        let mut out = Vec::new();
        while let Some(nl) = data.iter().position(|&b| b == b'\n') {
            let (head, rest) = data.split_at(nl);
            data = &rest[1..];
            if self.discarding {
                self.discarding = false;
                continue;
            }
            if self.partial.len() + head.len() > MAX_LINE {
                self.partial.clear();
                out.push(Err(too_long()));
                continue;
            }
            self.partial.extend_from_slice(head);
            out.push(self.take());
        }
        if !self.discarding {
            if self.partial.len() + data.len() > MAX_LINE {
                self.partial.clear();
                self.discarding = true;
                out.push(Err(too_long()));
            } else {
                self.partial.extend_from_slice(data);
            }
        }
        out
    }

    /// End of input: the last line when it had no newline.
    pub fn finish(&mut self) -> Option<Result<String, String>> {
        let discarding = std::mem::take(&mut self.discarding);
        (!discarding && !self.partial.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> Result<String, String> {
        let bytes = std::mem::take(&mut self.partial);
        String::from_utf8(bytes).map_err(|_| "stdin line is not UTF-8: ignored".to_string())
    }
}

fn too_long() -> String {
    format!("stdin line longer than {MAX_LINE} bytes: ignored")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(v: &[&str]) -> Vec<Result<String, String>> {
        v.iter().map(|s| Ok(s.to_string())).collect()
    }

    #[test]
    fn every_complete_line_of_one_read_comes_out_at_once() {
        let mut r = LineReader::default();
        assert_eq!(r.feed(b"a\nb\nc\n"), ok(&["a", "b", "c"]));
        assert_eq!(r.feed(b"d\ne"), ok(&["d"]));
        assert_eq!(r.feed(b"f"), ok(&[]));
        assert_eq!(r.feed(b"\n\n"), ok(&["ef", ""]));
        assert_eq!(r.feed(b"tail"), ok(&[]));
        assert_eq!(r.finish(), Some(Ok("tail".into())));
        assert_eq!(r.finish(), None);
    }

    #[test]
    fn over_long_and_non_utf8_lines_are_reported_and_skipped() {
        let mut r = LineReader::default();
        let big = vec![b'x'; MAX_LINE + 1];
        let out = r.feed(&big);
        assert_eq!(out.len(), 1);
        assert!(out[0].as_ref().unwrap_err().contains("longer than"));
        // The rest of that line is dropped; the next line is whole.
        assert_eq!(r.feed(b"xxx\nnext\n"), ok(&["next"]));
        let mut line = vec![b'y'; MAX_LINE];
        line.extend_from_slice(b"y\nafter\n");
        let out = r.feed(&line);
        assert!(out[0].is_err() && out[1] == Ok("after".into()), "{out:?}");
        let out = r.feed(b"\xff\xfe\nok\n");
        assert!(out[0].as_ref().unwrap_err().contains("UTF-8"));
        assert_eq!(out[1], Ok("ok".into()));
        assert!(r.partial.capacity() <= 2 * MAX_LINE + 16);
    }
}
