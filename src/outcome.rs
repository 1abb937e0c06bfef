//! The closed vocabularies of an order's fate: the outcome it is counted
//! under, the reason a message was dead-lettered and the stage that gave it
//! up. Each is an enum with one `as_str` — the label that metrics, dead-letter
//! headers, logs and the README all use — so a label cannot drift between
//! them, and every series can be created at start-up from `ALL`.

use std::fmt;

use crate::order::PoisonKind;

/// What became of one order, as `conveyor_orders_total{outcome}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Accepted,
    Rejected,
    Declined,
    DeadLettered,
    /// An order already stored with the same contents, acknowledged without work.
    Duplicate,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Accepted,
        Outcome::Rejected,
        Outcome::Declined,
        Outcome::DeadLettered,
        Outcome::Duplicate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Rejected => "rejected",
            Outcome::Declined => "declined",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Duplicate => "duplicate",
        }
    }
}

/// The stage that settled a message's fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Decode,
    Validate,
    Charge,
    Persist,
}

impl Stage {
    pub const ALL: [Stage; 4] = [
        Stage::Decode,
        Stage::Validate,
        Stage::Charge,
        Stage::Persist,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Validate => "validate",
            Stage::Charge => "charge",
            Stage::Persist => "persist",
        }
    }
}

/// Why a message went to the dead-letter destination
/// (`x-conveyor-reason`, `conveyor_dead_letters_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    /// Delivered more than `source.max_deliveries` times: it may be what
    /// keeps the daemon from finishing its work.
    RedeliveryLimit,
    /// The bytes are not an order the store can hold; decided at decode.
    Poison(PoisonKind),
    /// The `order_id` is stored with other contents.
    ConflictingDuplicate,
    /// A downstream kept failing transiently past `retry.max_elapsed`.
    RetriesExhausted,
    /// A downstream answered with a final refusal (a 4xx other than 429).
    DownstreamRefused,
    /// The database refused the row itself.
    Database,
    /// A stage panicked on this order.
    InternalError,
}

impl DeadLetterReason {
    /// Every reason, in the order of the flow.
    pub fn all() -> impl Iterator<Item = DeadLetterReason> {
        std::iter::once(DeadLetterReason::RedeliveryLimit)
            .chain(PoisonKind::ALL.into_iter().map(DeadLetterReason::Poison))
            .chain([
                DeadLetterReason::ConflictingDuplicate,
                DeadLetterReason::RetriesExhausted,
                DeadLetterReason::DownstreamRefused,
                DeadLetterReason::Database,
                DeadLetterReason::InternalError,
            ])
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::RedeliveryLimit => "redelivery_limit",
            DeadLetterReason::Poison(kind) => kind.as_str(),
            DeadLetterReason::ConflictingDuplicate => "conflicting_duplicate",
            DeadLetterReason::RetriesExhausted => "retries_exhausted",
            DeadLetterReason::DownstreamRefused => "downstream_refused",
            DeadLetterReason::Database => "database",
            DeadLetterReason::InternalError => "internal_error",
        }
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(Outcome, Stage, DeadLetterReason);

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// The README's table of outcomes, from its heading to the next one.
    fn readme_outcomes() -> &'static str {
        let readme = include_str!("../README.md");
        let start = readme
            .find("## Outcomes of one order")
            .expect("README has an outcomes section");
        let rest = &readme[start..];
        let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
        &rest[..end]
    }

    #[test]
    fn every_dead_letter_reason_is_in_the_readme_table() {
        let table = readme_outcomes();
        for reason in DeadLetterReason::all() {
            assert!(
                table.contains(&format!("`{reason}`")),
                "README's outcomes section does not name the reason `{reason}`"
            );
        }
    }

    #[test]
    fn every_stage_is_in_the_readme() {
        let readme = include_str!("../README.md");
        for stage in Stage::ALL {
            assert!(
                readme.contains(&format!("`{stage}`")),
                "README does not name the stage `{stage}`"
            );
        }
    }

    #[test]
    fn labels_are_unique_snake_case() {
        let labels: Vec<&str> = DeadLetterReason::all()
            .map(DeadLetterReason::as_str)
            .chain(Outcome::ALL.map(Outcome::as_str))
            .collect();
        let reasons: HashSet<&str> = DeadLetterReason::all().map(|r| r.as_str()).collect();
        assert_eq!(reasons.len(), DeadLetterReason::all().count());
        for l in labels {
            assert!(
                l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{l}"
            );
        }
    }
}
