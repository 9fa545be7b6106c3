//! kandle-runtime: the candle inference server.
//!
//! Layers, outermost first (TEI's router → core → backends):
//! - [`server`] and [`api`]: HTTP and the OpenAI wire format; no candle.
//! - [`engine`]: admission, the model thread, scheduling; [`sampling`] and [`detok`] are its
//!   pure helpers; [`tokenizer`] and [`chat`] prepare prompts.
//! - [`backend`]: the models on candle, behind the `CausalLm` / `Embedder` traits.
//! - [`source`] and [`hub`]: where a model comes from (`hf://org/repo@rev`), the hub download
//!   client and its on-disk cache.

pub mod api;
pub mod backend;
pub mod chat;
pub mod config;
pub mod conversations;
pub mod detok;
pub mod engine;
mod error;
pub mod fim;
pub mod grammar;
pub mod hub;
pub mod json_mode;
pub mod json_schema;
pub mod lark;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod pythonic;
pub mod reasoning;
pub mod responses;
pub mod sampling;
pub mod server;
pub mod source;
pub mod telemetry;
pub mod threads;
pub mod tokenizer;
pub mod tool_calls;
pub mod xml_calls;

pub use config::{ApiKey, DownloadConfig, HubArgs, ServeConfig};
pub use error::{Error, Result};
pub use server::run;
