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

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The layout's promise: the daemon's core builds without the tools.
    #[test]
    fn the_core_never_imports_the_tools() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let tools = src.join("tools");
        let main = src.join("main.rs");
        for f in files
            .iter()
            .filter(|f| !f.starts_with(&tools) && **f != main)
        {
            let text = std::fs::read_to_string(f).expect("read");
            assert!(
                !text.contains("crate::tools"),
                "{} imports the tools",
                f.display()
            );
        }
    }
}
