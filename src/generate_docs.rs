//! `blkrep generate-docs --dir DIR` (hidden): the man pages and shell completions of
//! the CLI, generated from its clap definition so they never drift from it.
//! `scripts/package.sh` runs it and packs what it writes.
//!
//! Writes into DIR: `man/blkrep.1` and one page per visible subcommand
//! (`man/blkrep-replica-run.1` ...), and `completions/blkrep.bash`,
//! `completions/_blkrep` (zsh) and `completions/blkrep.fish`.

use std::path::{Path, PathBuf};

use clap_complete::Shell;
use thiserror::Error;

/// Why the pages or completions cannot be written.
#[derive(Debug, Error)]
pub enum DocsError {
    /// A directory cannot be created.
    #[error("Cannot create {}", path.display())]
    Create {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Man pages cannot be written.
    #[error("Cannot write the man pages into {}", path.display())]
    Man {
        /// Their directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A completion script cannot be written.
    #[error("Cannot write the {shell} completions into {}", path.display())]
    Completion {
        /// The shell.
        shell: Shell,
        /// Their directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The command the completions complete.
const BINARY: &str = "blkrep";

/// The shells completions are generated for: those Debian packages complete with.
const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Writes the man pages and completions of `command` under `dir`; returns every file
/// written.
pub fn generate(command: clap::Command, dir: &Path) -> Result<Vec<PathBuf>, DocsError> {
    let man = create(&dir.join("man"))?;
    let completions = create(&dir.join("completions"))?;
    clap_mangen::generate_to(command.clone(), &man).map_err(|source| DocsError::Man {
        path: man.clone(),
        source,
    })?;
    let mut written = list(&man).map_err(|source| DocsError::Man {
        path: man.clone(),
        source,
    })?;
    let mut command = without_hidden_subcommands(&command);
    for shell in SHELLS {
        let path = clap_complete::generate_to(shell, &mut command, BINARY, &completions).map_err(
            |source| DocsError::Completion {
                shell,
                path: completions.clone(),
                source,
            },
        )?;
        written.push(path);
    }
    Ok(written)
}

/// `command` with its arguments and visible subcommands only: clap_complete, unlike
/// clap_mangen, would complete hidden ones (this generator among them).
fn without_hidden_subcommands(command: &clap::Command) -> clap::Command {
    clap::Command::new(BINARY)
        .args(command.get_arguments().cloned())
        .subcommands(
            command
                .get_subcommands()
                .filter(|subcommand| !subcommand.is_hide_set())
                .cloned(),
        )
}

fn create(path: &Path) -> Result<PathBuf, DocsError> {
    std::fs::create_dir_all(path).map_err(|source| DocsError::Create {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(path.to_path_buf())
}

/// The files in `dir`, sorted.
fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = std::fs::read_dir(dir)?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<std::io::Result<Vec<_>>>()?;
    files.sort();
    Ok(files)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn pages_and_completions_cover_every_visible_command_and_no_hidden_one() {
        let dir = tempfile::tempdir().unwrap();
        let written = generate(crate::Cli::command(), dir.path()).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for page in [
            "blkrep.1",
            "blkrep-primary.1",
            "blkrep-status.1",
            "blkrep-replica-run.1",
            "blkrep-replication-failover.1",
            "blkrep-cert-issue.1",
        ] {
            assert!(names.iter().any(|name| name == page), "{page} in {names:?}");
        }
        for completion in ["blkrep.bash", "_blkrep", "blkrep.fish"] {
            let text =
                std::fs::read_to_string(dir.path().join("completions").join(completion)).unwrap();
            assert!(text.contains("replication"), "{completion}");
            assert!(!text.contains("generate-docs"), "{completion}");
        }
        assert!(
            !names.iter().any(|name| name.contains("generate")),
            "{names:?}"
        );
        let primary = std::fs::read_to_string(dir.path().join("man/blkrep-primary.1")).unwrap();
        assert!(primary.contains("\\-\\-check"), "{primary}");
    }
}
