//! The systemd resource where systemd is not the init system (this test
//! machine, most containers): refused at build with a clear error. With a
//! marker directory present (as on a systemd host), it builds.

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
    let env = ResourceEnv::new("node-a");
    assert!(
        !env.systemd_marker.exists(),
        "this test expects a machine without systemd as init ({} exists)",
        env.systemd_marker.display()
    );
    let err = build("g1", &spec(), &env).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ResourceError::Config { .. }), "{msg}");
    assert!(
        msg.contains("g1/web") && msg.contains("systemd is not running") && msg.contains("/run/systemd/system"),
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
