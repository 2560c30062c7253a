//! Project tasks: setup of the build and test prerequisites, the package.

pub mod package;
pub mod setup;

pub use firewall_lab::{is_root, run, run_stdout};
