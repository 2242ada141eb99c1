//! The port-I/O devices of a NovaCron VM: a 16550 UART on 0x3f8 (IRQ 4), an i8042 that can
//! reset the guest, a debug console on 0xe9, the test guest's agent device, and the small
//! legacy stubs a PC guest probes (CMOS, PCI config, POST port).
//!
//! Interrupt controllers and the PIT are KVM's in-kernel ones.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::control::ExitReason;

/// The test guest's agent device ABI (ports, events, commands): `novacron_testguest::abi`.
pub use novacron_testguest::abi as agent_ports;

const SERIAL_BASE: u16 = 0x3f8;
const DEBUGCON_PORT: u16 = 0xe9;
/// The IRQ line of the UART.
pub const SERIAL_IRQ: u32 = 4;

/// A log file that rotates to `<name>.1` once it grows past a limit, so a chatty guest cannot
/// fill the host's disk.
pub struct RotatingLog {
    path: PathBuf,
    file: File,
    written: u64,
    max_bytes: u64,
}

impl RotatingLog {
    /// Opens (appends to) `path`; `max_bytes == 0` never rotates.
    pub fn open(path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok(RotatingLog {
            path: path.to_path_buf(),
            file,
            written,
            max_bytes,
        })
    }

    /// A log that writes to /dev/null (used only while swapping devices).
    fn placeholder() -> Self {
        RotatingLog {
            path: PathBuf::from("/dev/null"),
            file: OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .expect("/dev/null opens"),
            written: 0,
            max_bytes: 0,
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

impl Write for RotatingLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.max_bytes != 0 && self.written + buf.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Raises the UART's interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// What the VM must do after an I/O access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoOutcome {
    /// Go on.
    Continue,
    /// The guest (or its agent device) asked to end the VM.
    End(ExitReason, String),
}

/// State of the test guest's agent device.
#[derive(Debug, Default, Clone)]
pub struct GuestAgent {
    /// Guest-physical address of the guest's status page, once registered.
    pub status_gpa: Option<u64>,
    /// When the guest first reported progress (CLOCK_MONOTONIC, ns: comparable across
    /// processes, so a benchmark can time from its `spawn` to here).
    pub first_progress_ns: Option<u64>,
    /// When the guest said it was ready (CLOCK_MONOTONIC, ns).
    pub ready_ns: Option<u64>,
    /// Doorbells received.
    pub doorbells: u64,
    /// Exit-heavy NOP writes received.
    pub nops: u64,
    /// TSC frequency shown to the guest.
    pub tsc_khz: u32,
}

/// All port-I/O devices of one VM.
pub struct Devices {
    /// The UART on 0x3f8.
    pub serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, RotatingLog>,
    debugcon: RotatingLog,
    /// The agent device.
    pub agent: GuestAgent,
    cmos_index: u8,
    pci_address: u32,
}

impl Devices {
    /// Devices writing the console to `console` and the debug port to `debugcon`.
    pub fn new(
        serial_irq: EventFd,
        console: RotatingLog,
        debugcon: RotatingLog,
        tsc_khz: u32,
    ) -> Self {
        Devices {
            serial: Serial::new(IrqTrigger(serial_irq), console),
            debugcon,
            agent: GuestAgent {
                tsc_khz,
                ..Default::default()
            },
            cmos_index: 0,
            pci_address: 0,
        }
    }

    /// Replaces the UART with one in `state` (restore), keeping its interrupt and output.
    pub fn restore_serial(
        &mut self,
        state: &vm_superio::serial::SerialState,
    ) -> Result<(), crate::state::StateError> {
        let placeholder = Serial::new(
            IrqTrigger(
                self.serial
                    .interrupt_evt()
                    .0
                    .try_clone()
                    .map_err(|source| crate::state::StateError::Io {
                        path: "serial eventfd".into(),
                        source,
                    })?,
            ),
            RotatingLog::placeholder(),
        );
        let old = std::mem::replace(&mut self.serial, placeholder);
        let trigger = IrqTrigger(old.interrupt_evt().0.try_clone().map_err(|source| {
            crate::state::StateError::Io {
                path: "serial eventfd".into(),
                source,
            }
        })?);
        self.serial = Serial::from_state(
            state,
            trigger,
            vm_superio::serial::NoEvents,
            old.into_writer(),
        )
        .map_err(|e| crate::state::StateError::Corrupt(format!("serial state: {e:?}")))?;
        Ok(())
    }

    /// Handles an `in` of `data.len()` bytes from `port`.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            SERIAL_BASE..=0x3ff => data[0] = self.serial.read((port - SERIAL_BASE) as u8),
            // i8042 status: output buffer empty, input buffer empty.
            0x64 => data[0] = 0,
            0x60 => data[0] = 0,
            0x61 => data[0] = 0x20, // PIT channel 2 output high (calibration loops end)
            0x71 => data[0] = self.cmos_read(),
            0xcf8 => put(data, self.pci_address),
            agent_ports::PORT_ID => put(data, agent_ports::DEVICE_ID),
            agent_ports::PORT_TSC_KHZ => put(data, self.agent.tsc_khz),
            _ => {}
        }
    }

    /// Handles an `out` of `data` to `port`.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> IoOutcome {
        match port {
            SERIAL_BASE..=0x3ff => {
                if let Err(e) = self.serial.write((port - SERIAL_BASE) as u8, data[0]) {
                    tracing::warn!(error = ?e, "serial write failed");
                }
            }
            DEBUGCON_PORT => {
                if let Err(e) = self.debugcon.write_all(data) {
                    tracing::warn!(error = %e, "debug console write failed");
                }
            }
            0x64 if data[0] == 0xfe => {
                return IoOutcome::End(
                    ExitReason::GuestReset,
                    "i8042 reset (0xfe to port 0x64)".into(),
                )
            }
            0x70 => self.cmos_index = data[0] & 0x7f,
            0xcf8 if data.len() == 4 => self.pci_address = get(data),
            agent_ports::PORT_STATUS_GPA => {
                self.agent.status_gpa = Some(u64::from(get(data)));
            }
            agent_ports::PORT_NOP => self.agent.nops += 1,
            agent_ports::PORT_DOORBELL => return self.doorbell(get(data)),
            _ => {}
        }
        IoOutcome::Continue
    }

    fn doorbell(&mut self, event: u32) -> IoOutcome {
        use agent_ports::*;
        self.agent.doorbells += 1;
        match event {
            EV_READY => {
                self.agent.ready_ns.get_or_insert_with(monotonic_ns);
            }
            EV_PROGRESS => {
                self.agent
                    .first_progress_ns
                    .get_or_insert_with(monotonic_ns);
            }
            EV_POWEROFF => {
                return IoOutcome::End(ExitReason::GuestPoweroff, "guest agent power-off".into())
            }
            EV_PANIC => return IoOutcome::End(ExitReason::GuestPanic, String::new()),
            EV_VERIFY_DONE | EV_CMD_ACK => {}
            other => tracing::debug!(event = other, "unknown guest-agent event"),
        }
        IoOutcome::Continue
    }

    fn cmos_read(&self) -> u8 {
        match self.cmos_index {
            // Status register A: no update in progress; B: 24 h, binary.
            0x0a => 0x26,
            0x0b => 0x06,
            0x0d => 0x80, // valid RAM and time
            _ => 0,
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, owned `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn put(data: &mut [u8], v: u32) {
    let bytes = v.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&bytes[..n]);
}

fn get(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(dir: &Path) -> Devices {
        Devices::new(
            EventFd::new(0).unwrap(),
            RotatingLog::open(&dir.join("console.log"), 64).unwrap(),
            RotatingLog::open(&dir.join("debugcon.log"), 0).unwrap(),
            1000,
        )
    }

    #[test]
    fn serial_output_reaches_the_rotating_console_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = devices(dir.path());
        for b in b"hello\n".iter().cycle().take(100) {
            assert_eq!(d.pio_write(0x3f8, &[*b]), IoOutcome::Continue);
        }
        let current = std::fs::read(dir.path().join("console.log")).unwrap();
        let rotated = std::fs::read(dir.path().join("console.log.1")).unwrap();
        assert_eq!(current.len() + rotated.len(), 100);
        assert!(rotated.len() <= 64);
    }

    #[test]
    fn reset_and_poweroff_end_the_vm() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = devices(dir.path());
        assert!(matches!(
            d.pio_write(0x64, &[0xfe]),
            IoOutcome::End(ExitReason::GuestReset, _)
        ));
        let mut id = [0u8; 4];
        d.pio_read(agent_ports::PORT_ID, &mut id);
        assert_eq!(u32::from_le_bytes(id), agent_ports::DEVICE_ID);
        assert!(matches!(
            d.pio_write(
                agent_ports::PORT_DOORBELL,
                &agent_ports::EV_POWEROFF.to_le_bytes()
            ),
            IoOutcome::End(ExitReason::GuestPoweroff, _)
        ));
    }

    #[test]
    fn debug_console_goes_to_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = devices(dir.path());
        for b in b"ok\n" {
            d.pio_write(0xe9, &[*b]);
        }
        assert_eq!(
            std::fs::read(dir.path().join("debugcon.log")).unwrap(),
            b"ok\n"
        );
    }
}
