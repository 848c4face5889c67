//! This node's standby, kept in its state directory so that a restarted agent stays in
//! maintenance: `<state_dir>/<cluster>-<node>.standby` holds `move` or `park`; no file
//! means online. Written by write-then-rename, so a crash leaves the old or the new state.

use std::io::Write;
use std::path::{Path, PathBuf};

use tandem_engine::StandbyMode;

/// Where state goes when the configuration names no `state_dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tandem";

/// The standby state file cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StandbyStateError {
    /// Reading, writing or removing the file failed.
    #[error("cannot {what} the standby state file {path}; check the [cluster] state_dir directory and its permissions")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file holds something else than `move` or `park`.
    #[error(
        "the standby state file {path} holds {found:?}, expected `move` or `park`; fix it, or remove it to start online"
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What it holds (first line, trimmed).
        found: String,
    },
}

/// The state file of node `node` of cluster `cluster` under `state_dir`.
pub fn state_file(state_dir: Option<&Path>, cluster: &str, node: &str) -> PathBuf {
    state_dir.unwrap_or(Path::new(DEFAULT_STATE_DIR)).join(format!("{cluster}-{node}.standby"))
}

/// The persisted standby; `None` when the file does not exist.
pub fn load(path: &Path) -> Result<Option<StandbyMode>, StandbyStateError> {
    match std::fs::read_to_string(path) {
        Ok(s) => match s.trim() {
            "move" => Ok(Some(StandbyMode::Move)),
            "park" => Ok(Some(StandbyMode::Park)),
            other => Err(StandbyStateError::Invalid { path: path.to_owned(), found: other.chars().take(40).collect() }),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StandbyStateError::Io { what: "read", path: path.to_owned(), source }),
    }
}

/// Persists `mode` durably (`None` removes the file).
pub fn store(path: &Path, mode: Option<StandbyMode>) -> Result<(), StandbyStateError> {
    let io = |what| move |source| StandbyStateError::Io { what, path: path.to_owned(), source };
    let Some(mode) = mode else {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove")(e)),
            _ => sync_dir(path).map_err(io("remove")),
        };
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create the directory of"))?;
    }
    let tmp = path.with_extension("standby.tmp");
    let text = match mode {
        StandbyMode::Move => "move\n",
        StandbyMode::Park => "park\n",
    };
    let mut f = std::fs::File::create(&tmp).map_err(io("write"))?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(io("write"))?;
    std::fs::rename(&tmp, path).map_err(io("write"))?;
    sync_dir(path).map_err(io("write"))
}

/// Makes a rename or removal in `path`'s directory durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_absent_and_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let f = state_file(Some(&dir.path().join("sub")), "prod", "n1");
        assert!(f.ends_with("sub/prod-n1.standby"));
        assert_eq!(load(&f).unwrap(), None);
        store(&f, Some(StandbyMode::Park)).unwrap();
        assert_eq!(load(&f).unwrap(), Some(StandbyMode::Park));
        store(&f, Some(StandbyMode::Move)).unwrap();
        assert_eq!(load(&f).unwrap(), Some(StandbyMode::Move));
        store(&f, None).unwrap();
        assert!(!f.exists());
        store(&f, None).unwrap();
        std::fs::write(&f, "maybe\n").unwrap();
        let e = load(&f).unwrap_err();
        assert!(e.to_string().contains("\"maybe\"") && e.to_string().contains("remove it"), "{e}");
    }
}
