//! Entitle's domain core, shared by the gateway and the worker: configuration,
//! storage, codes, channel adapters, the channel-neutral commands, job
//! payloads and handlers, and email.

pub mod adjustment;
pub mod audit;
pub mod batch;
pub mod catalogue;
pub mod channel;
pub mod code;
pub mod command;
pub mod config;
pub mod context;
pub mod csv_cells;
pub mod db;
pub mod delivery;
pub mod email;
pub mod error;
pub mod feed;
pub mod finding;
pub mod group;
pub mod handlers;
pub mod inbox;
pub mod issuance;
pub mod lease;
pub mod letter;
pub mod lifecycle;
pub mod platform_event;
pub mod platform_key;
pub mod queue;
pub mod reconcile;
pub mod redemption;
pub mod reseal;
pub mod retry;
pub mod shutdown;
pub mod sweep;
pub mod telemetry;
pub mod token;

pub use config::Config;
pub use context::Context;
