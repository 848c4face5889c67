//! The systemd resource where systemd is not the init system (most containers):
//! refused at build with a clear error. With a marker directory present (as on
//! a systemd host), it builds. Both tests point the marker at a temporary path,
//! so they do not depend on this machine's init.

use std::time::Duration;

use tandem_config::{ResourceKind, SystemdResource as SystemdConfig};
use tandem_guest::resources::{ResourceEnv, ResourceError, build};

fn spec() -> tandem_config::Resource {
    tandem_config::Resource {
        name: "web".into(),
        depends_on: Vec::new(),
        kind: ResourceKind::Systemd(SystemdConfig {
            unit: "nginx.service".into(),
            start_timeout: Duration::from_secs(5),
            stop_timeout: Duration::from_secs(5),
        }),
    }
}

#[test]
fn refused_where_systemd_is_not_running() {
    // The default marker is the real /run/systemd/system, which this machine may or may not
    // have: point it at a path that surely does not exist, so the test means the same
    // everywhere.
    assert_eq!(ResourceEnv::new("node-a").systemd_marker, std::path::Path::new("/run/systemd/system"));
    let dir = tempfile::tempdir().unwrap();
    let mut env = ResourceEnv::new("node-a");
    env.systemd_marker = dir.path().join("run/systemd/system");
    let err = build("g1", &spec(), &env).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ResourceError::Config { .. }), "{msg}");
    assert!(
        msg.contains("g1/web")
            && msg.contains("systemd is not running")
            && msg.contains(&env.systemd_marker.display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("nginx.service") && msg.contains("kind = \"exec\""), "{msg}");
}

#[test]
fn builds_when_the_marker_exists() {
    tandem_testkit::require_program("systemctl", "systemd", &[]);
    let marker = tempfile::tempdir().unwrap();
    let mut env = ResourceEnv::new("node-a");
    env.systemd_marker = marker.path().to_path_buf();
    let r = build("g1", &spec(), &env).unwrap();
    assert_eq!(r.kind(), "systemd");
}
