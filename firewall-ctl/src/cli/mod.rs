//! The command-line interface: arguments and output.

pub mod args;
pub mod output;
