//! What the feeder and the consumer share, and nothing else: settings helpers, telemetry,
//! AWS client construction and error classification, the queue message, the key mapping and
//! database access.

pub mod aws;
pub mod control;
pub mod db;
pub mod deletion;
pub mod emf;
pub mod exit;
pub mod health;
pub mod host;
pub mod identity;
pub mod keys;
pub mod listing;
pub mod message;
pub mod reason;
pub mod references;
pub mod settings;
pub mod setup;
pub mod shutdown;
pub mod telemetry;
