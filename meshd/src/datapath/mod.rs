//! Appliers that turn `Desired` into kernel state.
pub mod ebpf;
pub mod tables;
