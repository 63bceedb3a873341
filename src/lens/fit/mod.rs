//! The all-pairs least-squares fit: on the CPU ([`cpu`]) or a GPU ([`device`]).

pub mod cpu;
pub mod device;

pub use cpu::*;
