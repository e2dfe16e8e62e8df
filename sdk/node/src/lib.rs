//! The native part of `@ferry/runtime`: ferry's library API (the [`ferry`]
//! crate) for Node.js, never through the `ferry` CLI.
//!
//! Nothing here blocks the event loop. Short calls run on libuv's thread
//! pool ([`task::Blocking`]); work tied to a stream (a spawned command's
//! output, a snapshot written to Node, a restore read from Node) runs on a
//! thread of its own and talks to JavaScript through threadsafe functions.
//! The JavaScript layer beside this crate (`index.js`) turns those callbacks
//! into Node streams and the JSON of [`error::Fail`] into `FerryError`.

// napi-derive registers the exports only outside test builds, where they
// would all look unused.
#![cfg_attr(test, allow(dead_code))]

mod child;
mod error;
mod flow;
mod images;
mod migrate;
mod options;
mod pool;
mod progress;
mod restore_stream;
mod runtime;
mod snapshot_stream;
mod store;
mod task;
mod vm;
