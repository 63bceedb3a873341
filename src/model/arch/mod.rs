//! One file per architecture family.

pub mod bert;
pub mod gemma3;
pub mod gpt2;
pub mod llama;
