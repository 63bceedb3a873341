//! The lenses: linear maps between hidden states fitted by least squares ([`fit`]), stored as one
//! [`maps::MapSet`] type, and scored by r^2 ([`r2`]).

pub mod fit;
pub mod maps;
pub mod r2;
