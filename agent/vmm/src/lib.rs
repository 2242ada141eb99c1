//! The NovaCron VMM: one KVM virtual machine per process.
//!
//! The agent starts one VMM process per VM (`novacron-agent vmm ...`). The process owns the
//! KVM VM, its guest memory, vCPU threads and devices, and serves a [`control`] socket.
#![deny(missing_docs)]

pub mod acpi;
pub mod arch;
pub mod boot;
pub mod config;
pub mod control;
pub mod devices;
pub mod dirty;
pub mod migrate;
pub mod mptable;
pub mod process;
pub mod state;
pub mod vm;
