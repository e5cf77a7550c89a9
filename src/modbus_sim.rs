//! A simulated Modbus RTU slave (rmodbus's server side): the demo's meter and the Modbus
//! state machine's unit tests answer requests with it. Not used by the gateway itself.

use rmodbus::server::context::ModbusContext;
use rmodbus::server::storage::ModbusStorageSmall;
use rmodbus::server::ModbusFrame;
use rmodbus::ModbusProto;

/// One slave: its unit address and 1000 of each register kind and bit kind (addresses
/// 0..=999; beyond, an exception "illegal data address").
pub struct SimSlave {
    /// The slave address it answers to.
    pub unit: u8,
    /// Its registers, coils and discrete inputs.
    pub storage: Box<ModbusStorageSmall>,
}

impl SimSlave {
    /// A slave at `unit` with every register 0 and every bit off.
    pub fn new(unit: u8) -> SimSlave {
        SimSlave {
            unit,
            storage: Box::default(),
        }
    }

    /// The response to a complete request frame, or `None` when the slave does not answer
    /// (another unit, a broken frame, a broadcast).
    pub fn answer(&mut self, request: &[u8]) -> Option<Vec<u8>> {
        let mut response = Vec::new();
        let mut frame = ModbusFrame::new(self.unit, request, ModbusProto::Rtu, &mut response);
        frame.parse().ok()?;
        if frame.processing_required {
            let result = if frame.readonly {
                frame.process_read(&*self.storage)
            } else {
                frame.process_write(&mut *self.storage)
            };
            result.ok()?;
        }
        if !frame.response_required {
            return None;
        }
        frame.finalize_response().ok()?;
        Some(response)
    }

    /// Sets holding register `address` (out-of-range addresses are ignored).
    pub fn set_holding(&mut self, address: u16, value: u16) {
        let _ = self.storage.set_holding(address, value);
    }

    /// Sets input register `address`.
    pub fn set_input(&mut self, address: u16, value: u16) {
        let _ = self.storage.set_input(address, value);
    }

    /// Sets coil `address`.
    pub fn set_coil(&mut self, address: u16, value: bool) {
        let _ = self.storage.set_coil(address, value);
    }

    /// Holding register `address` (0 beyond the range).
    pub fn holding(&self, address: u16) -> u16 {
        self.storage.get_holding(address).unwrap_or(0)
    }

    /// Coil `address` (off beyond the range).
    pub fn coil(&self, address: u16) -> bool {
        self.storage.get_coil(address).unwrap_or(false)
    }
}

/// How many bytes the complete request starting with `buf` has, once enough of it is there
/// to tell (`None`: not yet, or not a function the simulator knows: 1-6, 15, 16).
pub fn request_len(buf: &[u8]) -> Option<usize> {
    match *buf.get(1)? {
        1..=6 => Some(8),
        15 | 16 => buf.get(6).map(|&n| 9 + usize::from(n)),
        _ => None,
    }
}
