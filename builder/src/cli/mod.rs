//! The commands' code beyond argument parsing (`main.rs` parses and dispatches): one module
//! per command that does more than call the library.

pub mod check;
pub mod flash;
pub mod report;
pub mod serve;
