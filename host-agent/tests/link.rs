//! The host–guest link between the REAL binaries: a `tandem-host` on the libvirt test
//! driver and a `tandem-guest` (a one-node guest cluster with one exec group) that stands
//! in for the agent inside the VM. Also forged guests (an in-test client with the wrong key,
//! or claiming another VM), and the host library's `LinkRegistry::prepare_shutdown`
//! draining a real guest.
//!
//! The guest binary is built here with `cargo build -p tandem-guest` (a no-op when it is
//! fresh): Cargo gives a test only its own package's binaries.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tandem_config::LinkAddress;
use tandem_host::link::{LinkRegistry, LinkedVm};
use tandem_lease::{AreaParams, FileDisk, Lockspace, Timeouts};
use tandem_monitors::Secret;
use tandem_node::link::proof;
use tandem_proto::v1 as pb;
use tandem_proto::v1::guest_agent_client::GuestAgentClient;
use tandem_testkit::{ChildGuard, free_port};
use tokio_stream::wrappers::ReceiverStream;

mod common;

use common::guests::guest_binary;
use common::{Cluster, vm};

const WEB_UUID: &str = "00000000-0000-4000-8000-000000000001";
const DB_UUID: &str = "00000000-0000-4000-8000-000000000002";
const WEB_KEY: &str = "web-link-key-0123456789abcdef";
const DB_KEY: &str = "db-link-key-0123456789abcdef";

/// A one-node guest cluster (`n1`, group `app`: one `sleep`) linked to `address` as VM `uuid`.
struct Guest {
    dir: tempfile::TempDir,
    cgroup: PathBuf,
    api: String,
    agent: Option<ChildGuard>,
}

impl Guest {
    fn new(address: &str, uuid: &str, key: &str) -> Guest {
        Guest::with_link_extra(address, uuid, key, "")
    }

    /// Like [`Guest::new`], with `extra` lines in `[host_link]`.
    fn with_link_extra(address: &str, uuid: &str, key: &str, extra: &str) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let cgroup = tandem_lease::cgroup::cgroup2_mount()
            .expect("a cgroup2 mount (the guest runs in a cgroup of its own)")
            .join(format!(
                "tandem-e2e-link-{}-{}",
                std::process::id(),
                dir.path().file_name().unwrap().to_string_lossy()
            ));
        std::fs::create_dir_all(&cgroup).unwrap();
        std::fs::write(dir.path().join("key"), "guest-cluster-key-0123456789abcdef\n").unwrap();
        std::fs::write(dir.path().join("link.key"), format!("{key}\n")).unwrap();
        let lease = dir.path().join("lease");
        std::fs::File::create(&lease).unwrap().set_len(1 << 20).unwrap();
        Lockspace::init(
            &FileDisk::open(&lease).unwrap(),
            &AreaParams {
                host_slots: 4,
                resource_slots: 8,
                timeouts: Timeouts::from_renewal_ms(300),
                ..AreaParams::new("pg")
            },
            false,
        )
        .unwrap();
        let api = format!("127.0.0.1:{}", free_port());
        let toml = format!(
            "[cluster]\nname = \"pg\"\nkey_file = \"{key_file}\"\n\n[[link]]\nname = \"lo\"\nport = {port}\ninterval = \"100ms\"\ntimeout = \"1s\"\n\n\
             [lease]\ndevice = \"{lease}\"\nrenewal_interval = \"300ms\"\n\n[api]\nlisten = \"{api}\"\n\n\
             [host_link]\naddress = \"{address}\"\nvm_uuid = \"{uuid}\"\nkey_file = \"{link_key}\"\nheartbeat_interval = \"200ms\"\n{extra}\n\
             [[node]]\nname = \"n1\"\nid = 1\nlinks = {{ lo = \"127.0.0.1\" }}\nfence = {{ kind = \"lease-watchdog-only\" }}\n\n\
             [[group]]\nname = \"app\"\nnodes = [\"n1\"]\n\n[[group.resource]]\nname = \"sleeper\"\nkind = \"exec\"\nmode = \"simple\"\n\
             start = [\"/bin/sleep\", \"1000\"]\nstop_timeout = \"5s\"\n",
            key_file = dir.path().join("key").display(),
            port = free_port(),
            lease = lease.display(),
            link_key = dir.path().join("link.key").display(),
        );
        std::fs::write(dir.path().join("guest.toml"), toml).unwrap();
        let mut g = Guest { dir, cgroup, api, agent: None };
        g.start();
        g
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("guest.log")).unwrap_or_default()
    }

    fn start(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("guest.log")).unwrap();
        let mut cmd = Command::new(guest_binary());
        cmd.arg("--config")
            .arg(self.dir.path().join("guest.toml"))
            .arg("--cgroup-root")
            .arg(self.cgroup.join("groups"))
            .env("TANDEM_NODE", "n1")
            .env("TANDEM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        tandem_testkit::in_cgroup(&mut cmd, &self.cgroup);
        self.agent = Some(ChildGuard::spawn("tandem-guest n1", cmd));
    }

    /// Kills the agent (SIGKILL), as a crashed guest.
    fn kill(&mut self) {
        self.agent.take();
    }

    /// The guest agent's own status.
    async fn status(&self) -> Option<pb::GuestStatus> {
        let mut c = GuestAgentClient::connect(format!("http://{}", self.api)).await.ok()?;
        c.get_status(pb::GetStatusRequest {}).await.ok().map(|r| r.into_inner())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.agent.take();
        let _ = std::fs::write(self.cgroup.join("cgroup.kill"), "1");
        std::thread::sleep(Duration::from_millis(300));
        if let Ok(rd) = std::fs::read_dir(self.cgroup.join("groups")) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir(e.path());
            }
        }
        let _ = std::fs::remove_dir(self.cgroup.join("groups"));
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// A host cluster of one host `h1` running VMs `web` and `db`, with link keys, a TCP link
/// listener, and web's vsock socket at `<dir>/web.vsock_7702`. Returns the cluster and the
/// TCP port.
fn linked_host() -> (Cluster, u16) {
    let c = Cluster::new(1, &[vm("web", 64, 1, &["h1"]), vm("db", 64, 1, &["h1"])], None);
    let port = free_port();
    let mut toml = std::fs::read_to_string(c.path("host.toml")).unwrap();
    for (name, key) in [("web", WEB_KEY), ("db", DB_KEY)] {
        std::fs::write(c.path(&format!("{name}.key")), format!("{key}\n")).unwrap();
        let domain = format!("domain = \"{}\"\n", c.path(&format!("{name}.xml")).display());
        let extra = format!(
            "{domain}link_key_file = \"{}\"\nguest_cluster = \"pg\"\n{}",
            c.path(&format!("{name}.key")).display(),
            if name == "web" { format!("vsock_uds = \"{}\"\n", c.path("web.vsock").display()) } else { String::new() },
        );
        assert!(toml.contains(&domain));
        toml = toml.replace(&domain, &extra);
    }
    toml += &format!("\n[guest_link]\nlisten = \"{}:{port}\"\n", c.addr("h1"));
    std::fs::write(c.path("host.toml"), toml).unwrap();
    (c, port)
}

fn vm_status(s: &pb::HostClusterStatus, name: &str) -> pb::VmStatus {
    s.vms.iter().find(|v| v.name == name).cloned().unwrap_or_else(|| panic!("no VM {name} in {s:?}"))
}

/// An in-test client: runs the handshake for `uuid` with `key` and returns the host's answer
/// to the proof (a Welcome or the refusal).
async fn forge(address: LinkAddress, uuid: &str, key: &str) -> Result<pb::host_to_guest::Msg, tonic::Status> {
    let channel = tandem_node::link::connect(&address, None, Duration::from_secs(5)).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let gn = proof::nonce();
    tx.send(pb::GuestToHost {
        msg: Some(pb::guest_to_host::Msg::Hello(pb::LinkHello {
            vm_uuid: uuid.into(),
            guest_nonce: gn.to_vec(),
            guest_cluster: "pg".into(),
            node_name: "forger".into(),
            agent_version: "0".into(),
        })),
    })
    .await
    .unwrap();
    let mut inbound =
        pb::host_link_client::HostLinkClient::new(channel).attach(ReceiverStream::new(rx)).await?.into_inner();
    let Some(pb::host_to_guest::Msg::Challenge(c)) = inbound.message().await?.and_then(|m| m.msg) else {
        panic!("expected a challenge");
    };
    let guest_proof = proof::guest_proof(&Secret::new(key), uuid, &c.host_nonce, &gn);
    tx.send(pb::GuestToHost { msg: Some(pb::guest_to_host::Msg::Proof(pb::LinkProof { guest_proof })) }).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await.expect("an answer") {
        Ok(Some(m)) => Ok(m.msg.unwrap()),
        Ok(None) => Err(tonic::Status::cancelled("closed without an answer")),
        Err(s) => Err(s),
    }
}

#[test]
fn a_real_guest_links_over_tcp_forgers_are_refused_and_a_lost_link_is_only_reported() {
    let (c, port) = linked_host();
    let _h1 = c.start("h1");
    let w = c.watch();
    c.wait_all_running(&w, Duration::from_secs(60), |_| true);
    let mut guest = Guest::new(&format!("tcp:127.0.0.21:{port}"), WEB_UUID, WEB_KEY);

    let linked = c.wait("web's guest linked with its group running", Duration::from_secs(60), || {
        let v = vm_status(&c.try_status("h1").ok()?, "web");
        v.guest.filter(|g| g.connected && g.groups.iter().any(|x| x.name == "app" && x.active_here))
    });
    assert_eq!(
        (linked.node_name.as_str(), linked.guest_cluster.as_str(), linked.transport.as_str()),
        ("n1", "pg", "tcp")
    );
    assert!(linked.heartbeat_age_ms < 5000, "heartbeats every 200 ms: {linked:?}");
    // db has a key but no guest: shown as never linked.
    let db = vm_status(&c.status("h1"), "db").guest.expect("db has a guest link configured");
    assert!(!db.connected && !db.ever_linked, "{db:?}");

    // Forgers: the wrong key for web, and web's key claiming db. Both refused and logged,
    // and neither disturbs the real guest's link.
    let tcp = LinkAddress::Tcp { host: "127.0.0.21".into(), port };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let e = rt.block_on(forge(tcp.clone(), WEB_UUID, "a guess at web's key, long")).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = rt.block_on(forge(tcp.clone(), DB_UUID, WEB_KEY)).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let log = c.log_of("h1");
    assert!(
        log.contains("guest link refused")
            && log.contains(WEB_UUID)
            && log.contains(DB_UUID)
            && log.contains("wrong proof"),
        "{log}"
    );
    assert!(!log.contains(WEB_KEY) && !log.contains(DB_KEY), "a key appeared in the log");
    let still = vm_status(&c.status("h1"), "web").guest.unwrap();
    assert!(still.connected && still.node_name == "n1", "{still:?}");
    assert!(!vm_status(&c.status("h1"), "db").guest.unwrap().connected);

    // The guest dies: the host shows the link lost and leaves the VM where it runs.
    guest.kill();
    let lost = c.wait("web's link lost", Duration::from_secs(30), || {
        vm_status(&c.try_status("h1").ok()?, "web").guest.filter(|g| !g.connected)
    });
    assert!(lost.ever_linked, "{lost:?}");
    std::thread::sleep(Duration::from_secs(2));
    let web = vm_status(&c.status("h1"), "web");
    assert_eq!((web.state(), web.host.as_str(), web.restarts, web.failovers), (pb::VmState::Running, "h1", 0, 0));
    let log = c.log_of("h1");
    assert!(log.contains("guest link lost: VM web"), "{log}");
    assert!(log.contains("guest link up: VM web: guest n1 of cluster pg linked over tcp"), "{log}");
    drop(w);
}

/// Connects with `tls` and runs the first step of the handshake (hello → challenge): `Ok`
/// when the listener accepted the connection, the error text otherwise.
async fn reach(address: &LinkAddress, tls: Option<&tandem_node::link::LinkTls>) -> Result<(), String> {
    let channel =
        tandem_node::link::connect(address, tls, Duration::from_secs(5)).await.map_err(|e| format!("{e:?}"))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::GuestToHost {
        msg: Some(pb::guest_to_host::Msg::Hello(pb::LinkHello {
            vm_uuid: WEB_UUID.into(),
            guest_nonce: proof::nonce().to_vec(),
            guest_cluster: "pg".into(),
            node_name: "probe".into(),
            agent_version: "0".into(),
        })),
    })
    .await
    .unwrap();
    let attach = async {
        let mut inbound = pb::host_link_client::HostLinkClient::new(channel)
            .attach(ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("{e:?}"))?
            .into_inner();
        match inbound.message().await {
            Ok(Some(pb::HostToGuest { msg: Some(pb::host_to_guest::Msg::Challenge(_)) })) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), attach).await.map_err(|_| "no answer within 10 s".to_string())?
}

#[test]
fn a_guest_links_over_mutual_tls_and_clients_without_the_right_certificate_are_refused() {
    let (c, port) = linked_host();
    let pki = tandem_testkit::certs::make_pki(&c.path(""));
    let guest_cert = pki.client_cert("guest-web");
    let mut toml = std::fs::read_to_string(c.path("host.toml")).unwrap();
    toml += &format!(
        "\n[guest_link.tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca_cert.display()
    );
    std::fs::write(c.path("host.toml"), toml).unwrap();
    let _h1 = c.start("h1");
    let w = c.watch();
    c.wait_all_running(&w, Duration::from_secs(60), |_| true);
    // The test certificate names localhost, not the lab address the guest dials.
    let tls_line = format!(
        "tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\", server_name = \"localhost\" }}",
        pki.ca_cert.display(),
        guest_cert.cert.display(),
        guest_cert.key.display()
    );
    let _guest = Guest::with_link_extra(&format!("tcp:127.0.0.21:{port}"), WEB_UUID, WEB_KEY, &tls_line);
    let linked = c.wait("web's guest linked over TLS", Duration::from_secs(60), || {
        let v = vm_status(&c.try_status("h1").ok()?, "web");
        v.guest.filter(|g| g.connected && g.groups.iter().any(|x| x.name == "app" && x.active_here))
    });
    assert_eq!((linked.node_name.as_str(), linked.transport.as_str()), ("n1", "tcp+tls"), "{linked:?}");

    // Other clients: plain TCP, TLS without a client certificate, and TLS trusting another
    // CA (so the host's certificate does not verify) never reach the handshake.
    let tcp = LinkAddress::Tcp { host: "127.0.0.21".into(), port };
    let other = tempfile::tempdir().unwrap();
    let other_pki = tandem_testkit::certs::make_pki(other.path());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    let tls = |ca: &std::path::Path, identity: bool| tandem_node::link::LinkTls {
        ca: read(ca),
        identity: identity.then(|| (read(&guest_cert.cert), read(&guest_cert.key))),
        server_name: Some("localhost".into()),
    };
    // The right client passes the same gate, so the refusals below are the certificates'.
    rt.block_on(reach(&tcp, Some(&tls(&pki.ca_cert, true)))).expect("a client with the right certificate");
    let plain = rt.block_on(reach(&tcp, None));
    assert!(plain.is_err(), "plain TCP reached a TLS listener: {plain:?}");
    let anonymous = rt.block_on(reach(&tcp, Some(&tls(&pki.ca_cert, false))));
    assert!(anonymous.is_err(), "a client without a certificate was accepted: {anonymous:?}");
    let wrong_ca = rt.block_on(reach(&tcp, Some(&tls(&other_pki.ca_cert, true))));
    assert!(wrong_ca.is_err(), "the host's certificate verified against another CA: {wrong_ca:?}");
    // None of them disturbed the real guest.
    let still = vm_status(&c.status("h1"), "web").guest.unwrap();
    assert!(still.connected && still.transport == "tcp+tls", "{still:?}");
    drop(w);
}

#[test]
fn a_real_guest_links_over_the_vms_vsock_socket() {
    let (c, _port) = linked_host();
    let _h1 = c.start("h1");
    let w = c.watch();
    c.wait_all_running(&w, Duration::from_secs(60), |_| true);
    let socket = c.path("web.vsock_7702");
    let guest = Guest::new(&format!("unix:{}", socket.display()), WEB_UUID, WEB_KEY);
    let linked = c.wait("web's guest linked over its socket", Duration::from_secs(60), || {
        vm_status(&c.try_status("h1").ok()?, "web").guest.filter(|g| g.connected)
    });
    assert_eq!((linked.transport.as_str(), linked.peer.as_str()), ("vsock", socket.to_str().unwrap()));
    // db's guest may not use web's socket, even with db's own key.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let e = rt.block_on(forge(LinkAddress::Unix(socket.clone()), DB_UUID, DB_KEY)).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("belongs to another VM"), "{e:?}");
    assert!(c.log_of("h1").contains("this socket belongs to another VM"), "{}", c.log_of("h1"));
    drop((guest, w));
}

#[test]
fn prepare_shutdown_drains_a_real_guest() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let registry = LinkRegistry::new(
        "hv1",
        vec![LinkedVm {
            name: "web".into(),
            uuid: WEB_UUID.into(),
            key: Some(Secret::new(WEB_KEY)),
            guest_cluster: Some("pg".into()),
            heartbeat_timeout: None,
            vsock_uds: Some(dir.path().join("web.vsock")),
        }],
    );
    let stop = tokio_util::sync::CancellationToken::new();
    rt.block_on(tandem_host::link::serve(registry.clone(), None, stop.clone())).unwrap();
    let guest = Guest::new(&format!("unix:{}", dir.path().join("web.vsock_7702").display()), WEB_UUID, WEB_KEY);

    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let view = registry.view(WEB_UUID).unwrap();
        if view.connected && view.groups.iter().any(|g| g.name == "app" && g.active_here) {
            break;
        }
        assert!(Instant::now() < until, "the guest did not link with app running: {view:?}\n{}", guest.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let progress: Vec<pb::ShutdownProgress> = rt.block_on(async {
        let mut rx = registry.prepare_shutdown(WEB_UUID).await.unwrap();
        let mut all = Vec::new();
        while let Some(p) = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await.expect("progress in time") {
            all.push(p.unwrap_or_else(|e| panic!("{e}\n{}", guest.log())));
        }
        all
    });
    use pb::shutdown_progress::Progress;
    let groups: Vec<(String, i32)> = progress
        .iter()
        .filter_map(|p| match &p.progress {
            Some(Progress::Group(g)) => Some((g.group.clone(), g.step)),
            _ => None,
        })
        .collect();
    assert_eq!(
        groups,
        vec![("app".to_string(), pb::ShutdownStep::Started as i32), ("app".to_string(), pb::ShutdownStep::Done as i32)],
        "{progress:?}"
    );
    match progress.last().and_then(|p| p.progress.clone()) {
        Some(Progress::Done(d)) => assert!(d.safe_to_power_off && d.blockers.is_empty(), "{d:?}"),
        other => panic!("the last message is not ShutdownDone: {other:?}"),
    }
    // The guest's own view: app no longer runs there.
    let status = rt.block_on(guest.status()).expect("the guest answers");
    let app = status.groups.iter().find(|g| g.name == "app").unwrap();
    assert_ne!(app.state(), pb::GroupState::Started, "{app:?}");
    assert!(guest.log().contains("asks for a planned shutdown"), "{}", guest.log());
    stop.cancel();
}
