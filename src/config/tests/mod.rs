//! Tests of the configuration, by concern, with the helpers they share.

mod load;
mod secret;
mod validate;

use std::collections::HashMap;

use super::Config;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The first problem reported for `key` when `var` is set to `value`.
fn rejection(var: &str, value: &str) -> String {
    match Config::load_with_env(None, Some(env(&[(var, value)]))) {
        Ok(_) => panic!("{var}={value:?} was accepted"),
        Err(e) => e.to_string(),
    }
}
