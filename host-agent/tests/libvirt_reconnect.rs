//! Reconnection through a real libvirt daemon: a private `libvirtd` (own socket directory,
//! no driver modules loaded, so it serves only libvirt's built-in test driver) is killed and
//! restarted under a connected `LibvirtHypervisor`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tandem_host::hypervisor::libvirt::{LibvirtHypervisor, LibvirtOptions};
use tandem_host::hypervisor::{ConnectionState, EventKind, EventReason, Hypervisor, HypervisorError};
use tandem_testkit::{ChildGuard, require_program};
use tokio::sync::watch;

/// Generous bound for the daemon to come up, the loss to be noticed, and the reconnection.
const BOUND: Duration = Duration::from_secs(30);

const HOST_XML: &str = r#"<node>
  <cpu><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads><active>2</active><mhz>1000</mhz><model>i686</model></cpu>
  <memory>4194304</memory>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>epsilon</name>
    <uuid>66666666-6666-4666-8666-666666666666</uuid>
    <memory>65536</memory>
    <vcpu>1</vcpu>
    <os><type arch='i686'>hvm</type></os>
    <test:runstate>5</test:runstate>
  </domain>
</node>
"#;

/// A private libvirt daemon listening on a Unix socket in `dir`.
fn start_libvirtd(dir: &Path) -> ChildGuard {
    let libvirtd = require_program("libvirtd", "libvirt-daemon", &[]);
    let run = dir.join("run");
    let empty = dir.join("no-drivers");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::create_dir_all(&empty).unwrap();
    let _ = std::fs::remove_file(run.join("libvirt-sock"));
    let conf = dir.join("libvirtd.conf");
    std::fs::write(
        &conf,
        format!(
            "unix_sock_dir = \"{}\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n\
             unix_sock_rw_perms = \"0700\"\nlog_outputs = \"3:file:{}\"\n",
            run.display(),
            dir.join("libvirtd.log").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(libvirtd);
    cmd.arg("-f").arg(&conf).arg("-p").arg(dir.join("libvirtd.pid"));
    // No hypervisor driver modules: the daemon serves only the built-in test driver and
    // touches no system state.
    cmd.env("LIBVIRT_DRIVER_DIR", &empty);
    cmd.stdout(std::fs::File::create(dir.join("libvirtd.out")).unwrap());
    cmd.stderr(std::fs::File::create(dir.join("libvirtd.err")).unwrap());
    let guard = ChildGuard::spawn("libvirtd", cmd);
    let socket = socket_path(dir);
    let deadline = std::time::Instant::now() + BOUND;
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "libvirtd did not create {} in time", socket.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    guard
}

fn socket_path(dir: &Path) -> PathBuf {
    dir.join("run").join("libvirt-sock")
}

async fn wait_for(rx: &mut watch::Receiver<ConnectionState>, what: &str, pred: impl Fn(&ConnectionState) -> bool) {
    let outcome = tokio::time::timeout(BOUND, rx.wait_for(|s| pred(s))).await.map(|r| r.map(drop));
    match outcome {
        Ok(result) => result.expect("state channel closed"),
        Err(_) => panic!("connection never became {what}; last state {:?}", *rx.borrow()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_daemon_restarts_and_events_flow_again() {
    let dir = tempfile::tempdir().unwrap();
    let host_file = dir.path().join("host.xml");
    std::fs::write(&host_file, HOST_XML).unwrap();
    let uri = format!("test+unix://{}?socket={}", host_file.display(), socket_path(dir.path()).display());

    let mut daemon = start_libvirtd(dir.path());
    let options = LibvirtOptions {
        keepalive_interval: Duration::from_secs(1),
        keepalive_count: 3,
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_millis(500),
        ..LibvirtOptions::default()
    };
    let hv = LibvirtHypervisor::connect_with(&uri, options).await.expect("connect through libvirtd");
    let mut state = hv.connection_state();
    assert_eq!(*state.borrow(), ConnectionState::Connected { generation: 1 });
    assert_eq!(hv.list_domains().await.unwrap().len(), 1);

    // The daemon dies: the close callback (no polling) reports it.
    daemon.kill();
    wait_for(&mut state, "reconnecting", |s| matches!(s, ConnectionState::Reconnecting { .. })).await;
    let err = hv.list_domains().await.unwrap_err();
    assert!(matches!(err, HypervisorError::Disconnected { .. }), "{err:?}");
    assert!(err.to_string().contains(&uri), "{err}");

    // Attempts keep failing while the daemon is down…
    wait_for(
        &mut state,
        "a failed attempt",
        |s| matches!(s, ConnectionState::Reconnecting { attempts, last_error: Some(_) } if *attempts >= 1),
    )
    .await;

    // …and succeed once it is back.
    let _daemon = start_libvirtd(dir.path());
    wait_for(&mut state, "connected again", |s| matches!(s, ConnectionState::Connected { generation: 2 })).await;
    let names: Vec<String> = hv.list_domains().await.unwrap().into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["epsilon"]);

    // The lifecycle callback was registered again on the new connection.
    let mut events = hv.subscribe();
    hv.start("epsilon").await.unwrap();
    let event = tokio::time::timeout(BOUND, events.recv()).await.expect("event after reconnection").unwrap();
    assert_eq!((event.name.as_str(), event.kind, event.reason), ("epsilon", EventKind::Started, EventReason::Booted));

    hv.close().await;
}
