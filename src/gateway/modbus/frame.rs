//! Request frames and response parsing, through rmodbus (framing, CRC, the response checks),
//! plus the few checks rmodbus leaves to its caller.

use super::plan::{Raw, ReadBlock, WriteOp};
use crate::config::RegisterKind;
use rmodbus::client::ModbusRequest;
use rmodbus::ModbusProto;

/// Length of a normal response to a write (functions 05, 06, 16 echo 6 bytes + CRC).
pub const WRITE_RESPONSE_LEN: usize = 8;
/// Length of an exception response (unit, function | 0x80, code, CRC).
pub const EXCEPTION_LEN: usize = 5;

/// The read request for `block` of unit `unit`: rmodbus's request (kept to parse the
/// response), the frame, and the length of the normal response.
pub fn read_request(unit: u8, b: &ReadBlock) -> (ModbusRequest, Vec<u8>, usize) {
    let mut req = ModbusRequest::new(unit, ModbusProto::Rtu);
    let mut frame = Vec::with_capacity(8);
    // Counts are within the protocol's limits by construction (plan::read_blocks), so
    // building cannot fail.
    let built = match b.kind {
        RegisterKind::Holding => req.generate_get_holdings(b.start, b.count, &mut frame),
        RegisterKind::Input => req.generate_get_inputs(b.start, b.count, &mut frame),
        RegisterKind::Coil => req.generate_get_coils(b.start, b.count, &mut frame),
        RegisterKind::Discrete => req.generate_get_discretes(b.start, b.count, &mut frame),
    };
    debug_assert!(built.is_ok());
    let data = if b.kind.is_bit() {
        usize::from(b.count).div_ceil(8)
    } else {
        usize::from(b.count) * 2
    };
    (req, frame, 5 + data)
}

/// The write request of `op` at `address` of unit `unit`.
pub fn write_request(
    unit: u8,
    address: u16,
    op: WriteOp,
) -> Result<(ModbusRequest, Vec<u8>), String> {
    let mut req = ModbusRequest::new(unit, ModbusProto::Rtu);
    let mut frame = Vec::with_capacity(16);
    let built = match op {
        WriteOp::Coil(on) => req.generate_set_coil(address, u8::from(on), &mut frame),
        WriteOp::Register(v) => req.generate_set_holding(address, v, &mut frame),
        WriteOp::Registers(v) => req.generate_set_holdings_bulk(address, &v, &mut frame),
    };
    built.map_err(|e| format!("cannot build the write request: {e:?}"))?;
    Ok((req, frame))
}

/// The data of a complete normal read response of `expect` bytes (`frame` is exactly that
/// long); `None` when it is broken (CRC, unit, function, byte count, data length).
pub fn parse_read(req: &ModbusRequest, expect: usize, frame: &[u8]) -> Option<Raw> {
    // The byte count must be the one asked for: rmodbus trusts it.
    if frame.len() != expect || usize::from(frame[2]) != expect - 5 {
        return None;
    }
    let count = usize::from(req.count);
    if matches!(req.func.byte(), 1 | 2) {
        let mut bits: Vec<bool> = Vec::with_capacity(count);
        req.parse_bool(frame, &mut bits).ok()?;
        (bits.len() == count).then_some(Raw::Bits(bits))
    } else {
        let mut words: Vec<u16> = Vec::with_capacity(count);
        req.parse_u16(frame, &mut words).ok()?;
        (words.len() == count).then_some(Raw::Words(words))
    }
}

/// The name of a Modbus exception code.
pub fn exception_name(code: u8) -> &'static str {
    match code {
        1 => "illegal function",
        2 => "illegal data address",
        3 => "illegal data value",
        4 => "slave device failure",
        5 => "acknowledge",
        6 => "slave device busy",
        8 => "memory parity error",
        10 => "gateway path unavailable",
        11 => "gateway target device failed to respond",
        _ => "unknown exception",
    }
}
