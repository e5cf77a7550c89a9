//! On-disk record format (little-endian):
//!
//! ```text
//! offset size field
//!      0    2 magic       0x5A 0xD1
//!      2    4 len         payload length in bytes, <= MAX_PAYLOAD
//!      6    8 seq         >= 1
//!     14    8 time_ms     unix millis supplied by the caller
//!     22    4 header_crc  CRC-32 (IEEE) of bytes 0..22
//!     26  len payload
//! 26+len    4 crc         CRC-32 (IEEE) of bytes 0..26+len (header incl. header_crc, and payload)
//! ```
//!
//! The header checksum lets a scanner reject a bogus length before trusting it (so a flipped
//! length bit costs one 22-byte CRC, not a read of up to 1 MiB), and makes resynchronisation
//! after corruption cheap. The trailing checksum covers the whole record, so a torn write
//! (prefix of a record) or any bit flip is detected.

/// First two bytes of every record.
pub const MAGIC: [u8; 2] = [0x5A, 0xD1];
/// Bytes before the payload.
pub const HEADER_LEN: usize = 26;
/// Bytes after the payload.
pub const TRAILER_LEN: usize = 4;
/// Fixed per-record overhead.
pub const OVERHEAD: usize = HEADER_LEN + TRAILER_LEN;
/// Largest payload accepted by the encoder and the decoder (1 MiB). A corrupt length can
/// therefore never make a reader allocate more than this.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Highest seq a spool hands out or accepts from disk (2^63 - 1). It fits a signed 64-bit
/// integer (a backend's database column), and `seq + 1` never overflows. At a million
/// readings a second it lasts 292,000 years; a record above it can only be crafted, and the
/// spool treats it as corrupt.
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// A decoded record borrowing its payload from the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// The reading's seq, 1 to [`MAX_SEQ`] in records a spool writes.
    pub seq: u64,
    /// When the reading was taken: ms since the Unix epoch.
    pub time_ms: u64,
    /// The reading's JSON text (at most [`MAX_PAYLOAD`] bytes).
    pub payload: &'a [u8],
}

/// Why bytes at a position are not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer ends before the record does. At the end of a segment file this is a torn
    /// write; in a stream it means "read more bytes".
    #[error("record incomplete: {needed} bytes needed (torn write or more data to read)")]
    Incomplete {
        /// Bytes the whole record (or its header) needs from this position.
        needed: usize,
    },
    /// The bytes do not start with the record magic `5A D1`.
    #[error("no record magic at this position (corrupt data)")]
    BadMagic,
    /// The header's checksum does not match, or it holds impossible values.
    #[error("record header checksum mismatch or invalid header (corrupt data)")]
    BadHeader,
    /// The header is intact but announces a payload over [`MAX_PAYLOAD`].
    #[error("record payload length {len} exceeds the {MAX_PAYLOAD}-byte limit (corrupt data)")]
    TooLarge {
        /// The announced payload length, in bytes.
        len: u64,
    },
    /// The header is intact, the payload's checksum is not.
    #[error("record seq {seq}: checksum mismatch (bit rot or torn write)")]
    BadChecksum {
        /// The seq the header announces.
        seq: u64,
    },
}

/// A header whose own checksum is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The record's seq.
    pub seq: u64,
    /// The reading's time: ms since the Unix epoch.
    pub time_ms: u64,
    /// Payload length in bytes (at most [`MAX_PAYLOAD`]).
    pub len: usize,
}

impl Header {
    /// Total encoded size of the record this header starts.
    pub fn record_len(&self) -> usize {
        OVERHEAD + self.len
    }
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Decodes and checks a record header at the start of `buf`. Never panics.
pub fn decode_header(buf: &[u8]) -> Result<Header, DecodeError> {
    let m = buf.len().min(2);
    if buf[..m] != MAGIC[..m] {
        return Err(DecodeError::BadMagic);
    }
    if buf.len() < HEADER_LEN {
        return Err(DecodeError::Incomplete { needed: HEADER_LEN });
    }
    if crc32fast::hash(&buf[..22]) != u32_at(buf, 22) {
        return Err(DecodeError::BadHeader);
    }
    let len = u32_at(buf, 2) as u64;
    let seq = u64_at(buf, 6);
    let time_ms = u64_at(buf, 14);
    if seq == 0 {
        return Err(DecodeError::BadHeader);
    }
    if len > MAX_PAYLOAD as u64 {
        return Err(DecodeError::TooLarge { len });
    }
    Ok(Header {
        seq,
        time_ms,
        len: len as usize,
    })
}

/// Decodes one record at the start of `buf`; returns it and the number of bytes it occupies.
/// Pure; never panics on any input (fuzzed).
pub fn decode_record(buf: &[u8]) -> Result<(Record<'_>, usize), DecodeError> {
    let h = decode_header(buf)?;
    let total = h.record_len();
    if buf.len() < total {
        return Err(DecodeError::Incomplete { needed: total });
    }
    let body = total - TRAILER_LEN;
    if crc32fast::hash(&buf[..body]) != u32_at(buf, body) {
        return Err(DecodeError::BadChecksum { seq: h.seq });
    }
    Ok((
        Record {
            seq: h.seq,
            time_ms: h.time_ms,
            payload: &buf[HEADER_LEN..body],
        },
        total,
    ))
}

/// Appends the encoding of one record to `out`. The caller guarantees
/// `payload.len() <= MAX_PAYLOAD` and `seq >= 1` (the spool also keeps `seq <= MAX_SEQ`; the
/// format itself allows any non-zero seq).
pub fn encode_record(seq: u64, time_ms: u64, payload: &[u8], out: &mut Vec<u8>) {
    debug_assert!(payload.len() <= MAX_PAYLOAD && seq >= 1);
    let start = out.len();
    out.reserve(OVERHEAD + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&time_ms.to_le_bytes());
    let hcrc = crc32fast::hash(&out[start..start + 22]);
    out.extend_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}
