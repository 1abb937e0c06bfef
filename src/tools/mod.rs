//! Companions of the daemon that its core (pipeline, sources, the store's
//! write path) never imports: the HTTP intake in front of the broker
//! (`ingest`), the streaming export of stored orders (`export`), the
//! dead-letter tools (`dlq`), and the pieces of the lab — the downstream
//! simulator (`sim`), the load generator (`produce`) and the one-command
//! demonstration (`demo`).

pub mod cli;
pub mod demo;
pub mod dlq;
pub mod export;
pub mod ingest;
pub mod produce;
pub mod sim;
