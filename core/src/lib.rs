//! Pure-Rust core of pg_changerelay.
//!
//! Nothing in this crate links against Postgres: it holds the event model,
//! the JSON and binary encoders, the binary decoder, output-plugin option
//! parsing and time/LSN formatting, so all of it is tested with plain
//! `cargo test -p changerelay-core`.
#![deny(unsafe_code)]

pub mod apply;
pub mod binary;
pub mod chunk;
pub mod cursor;
pub mod event;
pub mod filter;
pub mod gate;
pub mod ha;
pub mod history;
pub mod images;
pub mod json;
pub mod lsn;
pub mod metadata;
pub mod options;
pub mod pack;
pub mod pgtext;
pub mod tables;
pub mod thread;
pub mod time;
pub mod timeline;
pub mod version_log;
pub mod versions;

pub use event::{Change, Column, Commit, Event, Message, Op, Row, Scalar, Tracking, TxnHeader, Value};
