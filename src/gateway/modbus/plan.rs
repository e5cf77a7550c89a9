//! What a device's poll reads and how raw registers become values (and values raw ones).
//!
//! [`read_blocks`] merges the contiguous registers of one kind into as few read requests as
//! the protocol allows (at most [`MAX_WORDS`] registers or [`MAX_BITS`] coils each);
//! [`decode`] turns a block's response into the value of one register (`raw × scale +
//! offset`); [`encode`] turns a `set` value back into what a write request carries, with the
//! range checks of the type.

use crate::config::{RegisterConfig, RegisterKind, ValueType, WordOrder};
use serde_json::{json, Value};

/// Most registers one read request may ask for (function 03/04).
pub const MAX_WORDS: u16 = 125;
/// Most coils or discrete inputs one read request may ask for (function 01/02).
pub const MAX_BITS: u16 = 2000;

/// One read request of a poll: `count` registers (or bits) of `kind` from `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBlock {
    /// The table read.
    pub kind: RegisterKind,
    /// First address.
    pub start: u16,
    /// How many registers or bits.
    pub count: u16,
}

/// The raw data of one block's response.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    /// Registers, in address order.
    Words(Vec<u16>),
    /// Coils or discrete inputs, in address order.
    Bits(Vec<bool>),
}

/// The read requests that cover `regs`: sorted by kind and address, contiguous ones merged.
pub fn read_blocks(regs: &[RegisterConfig]) -> Vec<ReadBlock> {
    let mut spans: Vec<(RegisterKind, u16, u16)> = regs
        .iter()
        .map(|r| (r.kind, r.address, r.value_type().width()))
        .collect();
    spans.sort();
    let mut blocks: Vec<ReadBlock> = Vec::new();
    for (kind, start, width) in spans {
        let max = if kind.is_bit() { MAX_BITS } else { MAX_WORDS };
        if let Some(b) = blocks.last_mut() {
            let end = u32::from(b.start) + u32::from(b.count);
            if b.kind == kind
                && end == u32::from(start)
                && u32::from(b.count) + u32::from(width) <= u32::from(max)
            {
                b.count += width;
                continue;
            }
        }
        blocks.push(ReadBlock {
            kind,
            start,
            count: width,
        });
    }
    blocks
}

/// The block of `blocks` that holds `reg`.
pub fn block_of(blocks: &[ReadBlock], reg: &RegisterConfig) -> Option<usize> {
    let end = u32::from(reg.address) + u32::from(reg.value_type().width());
    blocks.iter().position(|b| {
        b.kind == reg.kind
            && b.start <= reg.address
            && end <= u32::from(b.start) + u32::from(b.count)
    })
}

/// A float as JSON without the noise of binary arithmetic (`2301 × 0.1` is 230.1, not
/// 230.10000000000002): 12 significant digits.
fn tidy(v: f64) -> Value {
    let t: f64 = format!("{v:.11e}").parse().unwrap_or(v);
    json!(t)
}

/// The value of `reg` from the raw data of the block that starts at `start`; `None` when
/// the data is too short (a response that does not match its request).
pub fn decode(reg: &RegisterConfig, start: u16, raw: &Raw) -> Option<Value> {
    let at = usize::from(reg.address.checked_sub(start)?);
    let ty = reg.value_type();
    if let Raw::Bits(bits) = raw {
        return bits.get(at).map(|b| json!(*b));
    }
    let Raw::Words(words) = raw else {
        return None;
    };
    let w0 = *words.get(at)?;
    let pair = || -> Option<u32> {
        let w1 = *words.get(at + 1)?;
        let (hi, lo) = match reg.word_order {
            WordOrder::Big => (w0, w1),
            WordOrder::Little => (w1, w0),
        };
        Some((u32::from(hi) << 16) | u32::from(lo))
    };
    let plain = reg.scale == 1.0 && reg.offset == 0.0;
    let raw_value: f64 = match ty {
        ValueType::U16 if plain => return Some(json!(w0)),
        ValueType::I16 if plain => return Some(json!(w0 as i16)),
        ValueType::U32 if plain => return Some(json!(pair()?)),
        ValueType::I32 if plain => return Some(json!(pair()? as i32)),
        ValueType::U16 => f64::from(w0),
        ValueType::I16 => f64::from(w0 as i16),
        ValueType::U32 => f64::from(pair()?),
        ValueType::I32 => f64::from(pair()? as i32),
        ValueType::F32 => {
            let f = f32::from_bits(pair()?);
            if !f.is_finite() {
                // JSON has no NaN or infinity.
                return Some(Value::Null);
            }
            // The shortest decimal that is this f32 (0.1f32 is 0.1, not 0.10000000149).
            let shortest: f64 = f.to_string().parse().unwrap_or(f64::from(f));
            if plain {
                return Some(json!(shortest));
            }
            shortest
        }
        ValueType::Bool => return None,
    };
    Some(tidy(raw_value * reg.scale + reg.offset))
}

/// What a write request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOp {
    /// Function 05: one coil.
    Coil(bool),
    /// Function 06: one register.
    Register(u16),
    /// Function 16: two registers, in address order.
    Registers([u16; 2]),
}

/// The write of `value` to `reg`: scaled back to raw (`(value − offset) / scale`, rounded to
/// the nearest integer for integer types) and checked against the type's range.
pub fn encode(reg: &RegisterConfig, value: f64) -> Result<WriteOp, String> {
    if !value.is_finite() {
        return Err(format!("value {value} is not a finite number"));
    }
    let ty = reg.value_type();
    if ty == ValueType::Bool {
        return if value == 0.0 {
            Ok(WriteOp::Coil(false))
        } else if value == 1.0 {
            Ok(WriteOp::Coil(true))
        } else {
            Err(format!("a coil takes 0, 1, false or true, got {value}"))
        };
    }
    let raw = (value - reg.offset) / reg.scale;
    let ranged = |lo: f64, hi: f64| -> Result<f64, String> {
        let r = raw.round();
        if r < lo || r > hi {
            Err(format!(
                "value {value} is raw {r} after scale and offset, outside the {} range {lo}..={hi}",
                format!("{ty:?}").to_lowercase()
            ))
        } else {
            Ok(r)
        }
    };
    let words = |v: u32| -> WriteOp {
        let (hi, lo) = ((v >> 16) as u16, v as u16);
        match reg.word_order {
            WordOrder::Big => WriteOp::Registers([hi, lo]),
            WordOrder::Little => WriteOp::Registers([lo, hi]),
        }
    };
    Ok(match ty {
        ValueType::U16 => WriteOp::Register(ranged(0.0, 65535.0)? as u16),
        ValueType::I16 => WriteOp::Register(ranged(-32768.0, 32767.0)? as i16 as u16),
        ValueType::U32 => words(ranged(0.0, 4_294_967_295.0)? as u32),
        ValueType::I32 => words(ranged(-2_147_483_648.0, 2_147_483_647.0)? as i32 as u32),
        ValueType::F32 => {
            let f = raw as f32;
            if !f.is_finite() {
                return Err(format!("value {value} is outside the f32 range"));
            }
            words(f.to_bits())
        }
        ValueType::Bool => unreachable!("handled above"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(kind: RegisterKind, address: u16, ty: ValueType) -> RegisterConfig {
        RegisterConfig {
            name: format!("r{address}"),
            kind,
            address,
            ty: Some(ty),
            word_order: WordOrder::Big,
            scale: 1.0,
            offset: 0.0,
            writable: false,
        }
    }

    #[test]
    fn contiguous_registers_of_one_kind_merge_within_limits() {
        use RegisterKind::*;
        use ValueType::*;
        let regs = vec![
            reg(Input, 2, F32),
            reg(Input, 0, U16),
            reg(Input, 1, I16),
            reg(Input, 5, U16), // gap at 4: a new block
            reg(Holding, 4, U16),
            reg(Coil, 0, Bool),
            reg(Coil, 1, Bool),
        ];
        let b = read_blocks(&regs);
        let got: Vec<_> = b.iter().map(|b| (b.kind, b.start, b.count)).collect();
        assert_eq!(
            got,
            vec![(Holding, 4, 1), (Input, 0, 4), (Input, 5, 1), (Coil, 0, 2)]
        );
        assert_eq!(block_of(&b, &regs[0]), Some(1));
        assert_eq!(block_of(&b, &regs[3]), Some(2));
        // 130 contiguous registers: 125 + 5; 2001 coils: 2000 + 1.
        let many: Vec<_> = (0..130).map(|a| reg(Holding, a, U16)).collect();
        let counts: Vec<_> = read_blocks(&many).iter().map(|b| b.count).collect();
        assert_eq!(counts, vec![125, 5]);
        let coils: Vec<_> = (0..2001).map(|a| reg(Coil, a, Bool)).collect();
        let counts: Vec<_> = read_blocks(&coils).iter().map(|b| b.count).collect();
        assert_eq!(counts, vec![2000, 1]);
        // A 32-bit value is never split across two requests.
        let mut split: Vec<_> = (0..124).map(|a| reg(Holding, a, U16)).collect();
        split.push(reg(Holding, 124, U32));
        let counts: Vec<_> = read_blocks(&split).iter().map(|b| b.count).collect();
        assert_eq!(counts, vec![124, 2]);
    }

    #[test]
    fn decode_every_type_with_scale_offset_and_word_order() {
        use ValueType::*;
        let words = Raw::Words(vec![0xFFFE, 0x0001, 0x0002, 0x4148, 0x0000, 2301]);
        let mut r = reg(RegisterKind::Holding, 10, U16);
        assert_eq!(decode(&r, 10, &words), Some(json!(65534)));
        r.ty = Some(I16);
        assert_eq!(decode(&r, 10, &words), Some(json!(-2)));
        r.ty = Some(U32);
        r.address = 11;
        assert_eq!(decode(&r, 10, &words), Some(json!(0x0001_0002)));
        r.word_order = WordOrder::Little;
        assert_eq!(decode(&r, 10, &words), Some(json!(0x0002_0001)));
        r.ty = Some(I32);
        r.address = 10;
        r.word_order = WordOrder::Big;
        assert_eq!(decode(&r, 10, &words), Some(json!(-131_071)));
        r.ty = Some(F32);
        r.address = 13;
        assert_eq!(decode(&r, 10, &words), Some(json!(12.5)));
        r.scale = 2.0;
        r.offset = -5.0;
        assert_eq!(decode(&r, 10, &words), Some(json!(20.0)));
        let mut v = reg(RegisterKind::Input, 15, U16);
        v.scale = 0.1;
        assert_eq!(decode(&v, 10, &words), Some(json!(230.1)));
        v.address = 16;
        assert_eq!(decode(&v, 10, &words), None, "beyond the data");
        let c = reg(RegisterKind::Coil, 3, Bool);
        assert_eq!(
            decode(&c, 2, &Raw::Bits(vec![false, true])),
            Some(json!(true))
        );
    }

    #[test]
    fn encode_scales_back_and_checks_ranges() {
        use ValueType::*;
        let mut r = reg(RegisterKind::Holding, 0, U16);
        r.scale = 0.1;
        assert_eq!(encode(&r, 12.5), Ok(WriteOp::Register(125)));
        assert!(encode(&r, 6553.6).is_err());
        assert!(encode(&r, -0.1).is_err());
        r.ty = Some(I16);
        assert_eq!(encode(&r, -1.0), Ok(WriteOp::Register(0xFFF6)));
        r.ty = Some(U32);
        r.scale = 1.0;
        assert_eq!(encode(&r, 65537.0), Ok(WriteOp::Registers([1, 1])));
        r.word_order = WordOrder::Little;
        assert_eq!(encode(&r, 65538.0), Ok(WriteOp::Registers([2, 1])));
        r.ty = Some(F32);
        r.word_order = WordOrder::Big;
        assert_eq!(encode(&r, 12.5), Ok(WriteOp::Registers([0x4148, 0])));
        assert!(encode(&r, 1e300).is_err());
        assert!(encode(&r, f64::NAN).is_err());
        let c = reg(RegisterKind::Coil, 0, Bool);
        assert_eq!(encode(&c, 1.0), Ok(WriteOp::Coil(true)));
        assert!(encode(&c, 2.0).is_err());
    }
}
