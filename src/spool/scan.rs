//! Streaming record scanner over one segment file, with bounded memory (one read chunk plus at
//! most one record) and resynchronisation after corrupt bytes. Used by recovery and by readers.

use crate::spool::record::{decode_header, decode_record, DecodeError, Record, MAGIC, MAX_SEQ};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

const CHUNK: usize = 64 * 1024;

pub(crate) enum Item<'a> {
    /// A valid record at file offset `offset`, `len` bytes long.
    Record {
        rec: Record<'a>,
        offset: u64,
        len: u64,
    },
    /// Invalid bytes were skipped; the valid record after them is returned by the next call.
    Garbage,
    /// A record whose checksums are valid but whose contents no spool writes (a payload that
    /// is not UTF-8, a seq above `MAX_SEQ`): corrupt, skipped as a whole. `seq` is its seq.
    Invalid { seq: u64 },
    /// End of the file reached. `tail` is the length of the bytes from `offset` to the end of
    /// the file that are not a complete valid record (0 = clean end). The scanner does not move
    /// past them: if the file grows, a later call continues from the same place.
    End { offset: u64, tail: u64 },
}

pub(crate) struct Scanner {
    file: File,
    buf: Vec<u8>,
    /// Index in `buf` of the next unexamined byte.
    pos: usize,
    /// File offset of `buf[0]`.
    base: u64,
    /// Start of the run of invalid bytes being skipped, if any.
    garbage_start: Option<u64>,
    /// Largest seq (at most `MAX_SEQ`) seen in a header whose own checksum is valid but whose
    /// record is not (torn or corrupt payload, or contents no spool writes). 0 if none.
    pub max_bad_seq: u64,
}

/// Whether a record with valid checksums holds what a spool writes: a seq in 1..=`MAX_SEQ`
/// and a UTF-8 payload (the gateway stores JSON text). Anything else can only come from a
/// crafted or foreign file; accepting it would overflow seq arithmetic or leave a reading
/// that can never be sent (and so never acked).
pub(crate) fn acceptable(rec: &Record<'_>) -> bool {
    rec.seq <= MAX_SEQ && std::str::from_utf8(rec.payload).is_ok()
}

impl Scanner {
    pub fn new(file: File, offset: u64) -> io::Result<Scanner> {
        let mut s = Scanner {
            file,
            buf: Vec::new(),
            pos: 0,
            base: 0,
            garbage_start: None,
            max_bad_seq: 0,
        };
        s.seek(offset)?;
        Ok(s)
    }

    /// Repositions at `offset` (must be a record boundary to be useful).
    pub fn seek(&mut self, offset: u64) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        self.buf.clear();
        self.pos = 0;
        self.base = offset;
        self.garbage_start = None;
        Ok(())
    }

    /// Goes back to `offset`, the start of a record this scanner just returned, so the next
    /// call returns it again: from the buffer when it still holds it, else by seeking.
    pub fn back_to(&mut self, offset: u64) -> io::Result<()> {
        if offset >= self.base && offset <= self.offset() {
            self.pos = (offset - self.base) as usize;
            self.garbage_start = None;
            Ok(())
        } else {
            self.seek(offset)
        }
    }

    /// File offset of the next unexamined byte.
    pub fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// Makes at least `need` bytes available after `pos`; false if the file ends first.
    fn fill(&mut self, need: usize) -> io::Result<bool> {
        if self.buf.len() - self.pos >= need {
            return Ok(true);
        }
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.base += self.pos as u64;
            self.pos = 0;
        }
        while self.buf.len() < need {
            let want = (need - self.buf.len()).max(CHUNK);
            let old = self.buf.len();
            self.buf.resize(old + want, 0);
            let n = loop {
                match self.file.read(&mut self.buf[old..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.buf.truncate(old);
                        return Err(e);
                    }
                }
            };
            self.buf.truncate(old + n);
            if n == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn skip_garbage(&mut self) {
        if self.garbage_start.is_none() {
            self.garbage_start = Some(self.offset());
        }
        // Advance at least one byte, then to the next possible magic.
        self.pos += 1;
        let rest = &self.buf[self.pos..];
        match rest.windows(2).position(|w| w == MAGIC) {
            Some(i) => self.pos += i,
            None => {
                // Keep a trailing first magic byte: its partner may arrive with the next read.
                let keep = usize::from(rest.last() == Some(&MAGIC[0]));
                self.pos += rest.len() - keep;
            }
        }
    }

    /// Next item. Terminates on any input: every loop iteration either consumes at least one
    /// byte or reads more of the (finite) file.
    pub fn next(&mut self) -> io::Result<Item<'_>> {
        loop {
            if !self.fill(1)? {
                let start = self.garbage_start.unwrap_or(self.offset());
                return Ok(Item::End {
                    offset: start,
                    tail: self.offset() - start,
                });
            }
            match decode_record(&self.buf[self.pos..]) {
                Ok((rec, used)) => {
                    let offset = self.offset();
                    if self.garbage_start.take().is_some() {
                        return Ok(Item::Garbage);
                    }
                    if !acceptable(&rec) {
                        let seq = rec.seq;
                        if seq <= MAX_SEQ {
                            self.max_bad_seq = self.max_bad_seq.max(seq);
                        }
                        self.pos += used;
                        return Ok(Item::Invalid { seq });
                    }
                    let start = self.pos;
                    self.pos += used;
                    let (rec, _) = decode_record(&self.buf[start..start + used])
                        .expect("record decoded a moment ago");
                    return Ok(Item::Record {
                        rec,
                        offset,
                        len: used as u64,
                    });
                }
                Err(DecodeError::Incomplete { needed }) => {
                    if !self.fill(needed)? {
                        // Torn record at the end of the file (or, in a growing file, one not yet
                        // fully visible): report it, remember its seq if the header is intact.
                        if let Ok(h) = decode_header(&self.buf[self.pos..]) {
                            if h.seq <= MAX_SEQ {
                                self.max_bad_seq = self.max_bad_seq.max(h.seq);
                            }
                        }
                        let start = self.garbage_start.unwrap_or(self.offset());
                        let end = self.base + self.buf.len() as u64;
                        return Ok(Item::End {
                            offset: start,
                            tail: end - start,
                        });
                    }
                }
                Err(e) => {
                    if let DecodeError::BadChecksum { seq } = e {
                        if seq <= MAX_SEQ {
                            self.max_bad_seq = self.max_bad_seq.max(seq);
                        }
                    }
                    self.skip_garbage();
                }
            }
        }
    }
}
