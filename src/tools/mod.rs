//! Companions of the daemon that its core (pipeline, sources, the store's
//! write path) never imports: the HTTP intake in front of the broker
//! (`ingest`), the streaming export of stored orders (`export`) and the
//! dead-letter tools (`dlq`).

pub mod cli;
pub mod dlq;
pub mod export;
pub mod ingest;
