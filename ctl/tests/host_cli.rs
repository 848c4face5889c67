//! `tandemctl hosts|vms|vm|domains` as a user runs them: the real binary against the node's
//! real API server with the host agent's service mounted (`tandem_host::api`), a small
//! in-test node behind `Control`, and libvirt's test driver as this host's hypervisor;
//! human and JSON output, exit codes 0/1/64/69, mutual TLS.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tandem_config::{ApiRole, ApiSettings, ApiTls};
use tandem_host::api::{HostFacts, VmFacts, host_service};
use tandem_host::hypervisor::Hypervisor;
use tandem_host::hypervisor::libvirt::LibvirtHypervisor;
use tandem_node::api::{ApiServer, BoxFuture, Control, ControlError, OperatorAck, OperatorAction, OperatorRequest, pb};
use tandem_testkit::certs::make_pki;
use tokio::sync::{broadcast, mpsc, oneshot};

const DB_UUID: &str = "11111111-1111-4111-8111-111111111111";

/// hv1 (this host) runs db (unless `db_on` says otherwise); hv2 is lost; big is blocked
/// and fits nowhere.
struct Fake {
    accepted: Mutex<Vec<OperatorRequest>>,
    events: broadcast::Sender<pb::Event>,
    db_on: Mutex<String>,
}

impl Control for Fake {
    fn status(&self) -> BoxFuture<'_, Result<pb::GuestStatus, ControlError>> {
        let node = |name: &str, id, state: pb::NodeState, local| pb::NodeStatus {
            name: name.into(),
            id,
            state: state as i32,
            local,
            ..Default::default()
        };
        let db_on = self.db_on.lock().unwrap().clone();
        Box::pin(async move {
            Ok(pb::GuestStatus {
                node: "hv1".into(),
                node_id: 1,
                quorum: true,
                nodes: vec![node("hv1", 1, pb::NodeState::Up, true), node("hv2", 2, pb::NodeState::Down, false)],
                groups: vec![
                    pb::GroupStatus {
                        name: "db".into(),
                        state: pb::GroupState::Started as i32,
                        location: db_on,
                        restarts: 1,
                        ..Default::default()
                    },
                    pb::GroupStatus {
                        name: "big".into(),
                        state: pb::GroupState::Blocked as i32,
                        failed_on: vec!["hv2".into()],
                        not_running: Some(pb::NotRunning {
                            reason: pb::NotRunningReason::NoEligibleNode as i32,
                            node: String::new(),
                            detail: vec![],
                        }),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            })
        })
    }

    fn operator(&self, request: OperatorRequest) -> BoxFuture<'_, Result<OperatorAck, ControlError>> {
        Box::pin(async move {
            let mut log = self.accepted.lock().unwrap();
            log.push(request);
            Ok(OperatorAck { seq: log.len() as u64 + 40 })
        })
    }

    fn deliver(&self, _seq: u64, _request: OperatorRequest) -> BoxFuture<'_, Result<(), ControlError>> {
        Box::pin(async { Err(ControlError::NotPossible("not used here".into())) })
    }

    fn prepare_shutdown(&self) -> BoxFuture<'_, Result<mpsc::Receiver<pb::ShutdownProgress>, ControlError>> {
        Box::pin(async { Err(ControlError::NotPossible("not used here".into())) })
    }

    fn subscribe(&self) -> broadcast::Receiver<pb::Event> {
        self.events.subscribe()
    }
}

/// A running API server on its own runtime; stops when dropped.
struct Agent {
    addr: SocketAddr,
    fake: Arc<Fake>,
    lease: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    rt: Option<tokio::runtime::Runtime>,
    dir: tempfile::TempDir,
}

impl Agent {
    /// With the host service when `host_api`, else only the node API (as a guest agent).
    fn start(settings: ApiSettings, host_api: bool) -> Agent {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let fake = Arc::new(Fake {
            accepted: Mutex::new(Vec::new()),
            events: broadcast::channel(16).0,
            db_on: Mutex::new("hv1".into()),
        });
        let lease = Arc::new(AtomicBool::new(true));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.xml");
        std::fs::write(
            &path,
            format!(
                "<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads>\
                 <active>2</active><mhz>2400</mhz><model>i686</model></cpu><memory>4194304</memory>\
                 <domain type='test'><name>db-vm</name><uuid>{DB_UUID}</uuid><memory>1048576</memory>\
                 <vcpu>2</vcpu><os><type arch='i686'>hvm</type></os></domain></node>"
            ),
        )
        .unwrap();
        let uri = format!("test://{}", path.display());
        let control: Arc<dyn Control> = fake.clone();
        let valid = lease.clone();
        let bound = rt.block_on(async {
            let mut server = ApiServer::new(&settings, control.clone()).unwrap();
            if host_api {
                let hypervisor: Arc<dyn Hypervisor> = Arc::new(LibvirtHypervisor::connect(&uri).await.unwrap());
                let hosts = vec![
                    HostFacts { name: "hv1".into(), id: 1, capacity: Some((4096, 4)) },
                    HostFacts { name: "hv2".into(), id: 2, capacity: None },
                ];
                let vms = vec![
                    VmFacts {
                        group: "db".into(),
                        domain: "db-vm".into(),
                        uuid: DB_UUID.into(),
                        memory_mib: 1024,
                        vcpus: 2,
                    },
                    VmFacts {
                        group: "big".into(),
                        domain: "big-vm".into(),
                        uuid: "33333333-3333-4333-8333-333333333333".into(),
                        memory_mib: 8192,
                        vcpus: 2,
                    },
                ];
                let lease_valid = Arc::new(move || valid.load(Ordering::SeqCst));
                server = server.with_service(host_service("hv1".into(), control, lease_valid, hypervisor, hosts, vms));
            }
            server.bind().await.unwrap()
        });
        let addr = bound.local_addr();
        let (tx, rx) = oneshot::channel();
        rt.spawn(bound.serve(async move {
            let _ = rx.await;
        }));
        Agent { addr, fake, lease, stop: Some(tx), rt: Some(rt), dir }
    }

    fn plain(host_api: bool) -> Agent {
        Agent::start(ApiSettings { listen: "127.0.0.1:0".parse().unwrap(), ..ApiSettings::default() }, host_api)
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

fn tandemctl(endpoint: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandemctl"));
    c.env("TANDEM_ENDPOINT", endpoint);
    c
}

fn run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let out: Output = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn words(l: &str) -> Vec<String> {
    l.split_whitespace().map(str::to_string).collect()
}

fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines().find(|l| l.trim_start().starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?}:\n{out}"))
}

#[test]
fn hosts_human_and_json() {
    let agent = Agent::plain(true);
    let (code, out, err) = run(tandemctl(&agent.url()).arg("hosts"));
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("cluster as seen by hv1  quorum: yes\n"), "{out}");
    assert_eq!(words(line(&out, "HOST")), ["HOST", "ID", "STATE", "VMS", "MEMORY", "MiB", "VCPUS"]);
    assert_eq!(words(line(&out, "hv1")), ["hv1", "1", "self", "1", "1024/4096", "2/4"]);
    assert_eq!(words(line(&out, "hv2")), ["hv2", "2", "lost", "0", "0/-", "0/-"]);

    let (code, out, err) = run(tandemctl(&agent.url()).args(["hosts", "--json"]));
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["host"].as_str(), v["lease_valid"].as_bool()), (Some("hv1"), Some(true)));
    assert_eq!(
        v["hosts"][0],
        json!({ "name": "hv1", "id": 1, "state": "self", "capacity": { "memory_mib": 4096, "vcpus": 4 },
                "used_memory_mib": 1024, "used_vcpus": 2, "vm_count": 1, "maintenance": false })
    );
    assert_eq!(v["hosts"][1]["capacity"], serde_json::Value::Null);

    // A host whose lease expired says so on top of its answer.
    agent.lease.store(false, Ordering::SeqCst);
    let (code, out, err) = run(tandemctl(&agent.url()).arg("hosts"));
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("WARNING: hv1's host lease has expired"), "{out}");
}

#[test]
fn vms_human_and_json_with_placement_problems() {
    let agent = Agent::plain(true);
    let (code, out, err) = run(tandemctl(&agent.url()).arg("vms"));
    assert_eq!(code, Some(0), "{out}{err}");
    // The last column before WHY is the guest link: none served here.
    assert_eq!(words(line(&out, "db ")), ["db", "running", "hv1", "-", "1", "0", "1024", "2", "-"]);
    let big = line(&out, "big ");
    assert_eq!(words(big)[..9], ["big", "blocked", "-", "-", "0", "0", "8192", "2", "-"]);
    assert!(big.ends_with("no host it may run on is up; failed on hv2"), "{big}");
    let problems = out.split("placement problems:\n").nth(1).unwrap_or_else(|| panic!("no problems:\n{out}"));
    assert_eq!(problems, "  big: needs 8192 MiB and 2 vCPUs; hv1: 3072 MiB and 2 vCPUs free; hv2: lost\n");

    let (code, out, err) = run(tandemctl(&agent.url()).args(["vms", "--json"]));
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["vms"][0]["host"], "hv1");
    assert_eq!(v["vms"][0]["uuid"], DB_UUID);
    assert_eq!(v["vms"][0]["not_running"], serde_json::Value::Null);
    assert_eq!(v["vms"][0]["guest"], serde_json::Value::Null);
    assert_eq!(v["vms"][1]["host"], serde_json::Value::Null);
    assert_eq!(v["vms"][1]["state"], "blocked");
    assert_eq!(v["vms"][1]["not_running"], json!({ "reason": "no-eligible-node", "node": null }));
    assert_eq!(v["problems"][0]["vm"], "big");
}

#[test]
fn vm_commands_and_their_exit_codes() {
    let agent = Agent::plain(true);
    let url = agent.url();
    let (code, out, err) = run(tandemctl(&url).args(["vm", "move", "db", "--to", "hv2"]));
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out.trim(), "accepted: move of VM db to hv2 (command #41); `tandemctl events` shows it happen");
    let (code, out, err) = run(tandemctl(&url).args(["vm", "stop", "db-vm"]));
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = run(tandemctl(&url).args(["vm", "start", "big"]));
    assert_eq!(code, Some(0), "{out}{err}");
    let expect = |g: &str, action| OperatorRequest { group: g.into(), action };
    assert_eq!(
        *agent.fake.accepted.lock().unwrap(),
        vec![
            expect("db", OperatorAction::Move { to: Some("hv2".into()) }),
            expect("db", OperatorAction::Stop),
            expect("big", OperatorAction::Start),
        ]
    );

    // Refused: exit 1 with the agent's message.
    let (code, _, err) = run(tandemctl(&url).args(["vm", "start", "nope"]));
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        err.trim(),
        "tandemctl: the agent refused (not found): no VM named \"nope\" in this cluster; `tandemctl vms` lists them"
    );
    let (code, _, err) = run(tandemctl(&url).args(["vm", "move", "db", "--to", "hv9"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no host named \"hv9\""), "{err}");
    // Usage: exit 64.
    let (code, _, err) = run(tandemctl(&url).args(["vm", "move", "db"]));
    assert_eq!(code, Some(64), "{err}");
    let (code, _, err) = run(tandemctl(&url).args(["--timeout", "2", "vm", "reboot", "db"]));
    assert_eq!(code, Some(64), "{err}");
    assert_eq!(agent.fake.accepted.lock().unwrap().len(), 3);
}

#[test]
fn vm_dump_writes_the_guest_s_memory_and_is_refused_where_the_vm_does_not_run() {
    let agent = Agent::plain(true);
    let url = agent.url();
    let core = agent.dir.path().join("db.core");
    let (code, out, err) = run(tandemctl(&url).args(["vm", "dump", "db", "--path"]).arg(&core));
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(
        out.trim(),
        format!(
            "dumped: VM db (domain db-vm) on hv1 to {}; it stopped as crashed and the cluster recovers it \
             (`tandemctl vms` shows where)",
            core.display()
        )
    );
    assert!(std::fs::metadata(&core).is_ok_and(|m| m.len() > 0), "no dump at {}", core.display());
    // The hypervisor's own view: stopped as crashed, not by anyone's request.
    let (code, out, err) = run(tandemctl(&url).args(["domains", "--json"]));
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["domains"][0]["state"].as_str(), v["domains"][0]["reason"].as_str()),
        (Some("shutoff"), Some("crashed"))
    );
    // A dump is no operator command of the node: nothing was queued.
    assert!(agent.fake.accepted.lock().unwrap().is_empty());

    // Not running here any more: refused (the node still places it here) …
    let (code, _, err) = run(tandemctl(&url).args(["vm", "dump", "db-vm", "--path", "/tmp/never.core"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("(not possible now): VM db is not running on hv1"), "{err}");
    // … and once the cluster runs it on another host, the refusal names that host.
    *agent.fake.db_on.lock().unwrap() = "hv2".into();
    let (code, _, err) = run(tandemctl(&url).args(["vm", "dump", "db", "--path", "/tmp/never.core"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("VM db runs on hv2, not on hv1; send the request to hv2's agent"), "{err}");
    assert!(!std::path::Path::new("/tmp/never.core").exists());

    // Bad arguments: a relative path is refused by the agent, a missing one by tandemctl.
    let (code, _, err) = run(tandemctl(&url).args(["vm", "dump", "db", "--path", "db.core"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("(invalid argument): DumpVm: `path` \"db.core\" is not an absolute path"), "{err}");
    // Nothing is ever overwritten: the first dump's file is there now.
    let (code, _, err) = run(tandemctl(&url).args(["vm", "dump", "db", "--path"]).arg(&core));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("the file must not exist yet"), "{err}");
    let (code, _, err) = run(tandemctl(&url).args(["vm", "dump", "db"]));
    assert_eq!(code, Some(64), "{err}");
    let (code, _, err) = run(tandemctl(&url).args(["vm", "dump", "nope", "--path", "/tmp/x.core"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no VM named \"nope\""), "{err}");
}

#[test]
fn domains_human_json_and_an_expired_lease() {
    let agent = Agent::plain(true);
    let (code, out, err) = run(tandemctl(&agent.url()).arg("domains"));
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("domains of hv1 (test:///"), "{out}");
    // The test driver gives no reason for domains running from its host file.
    assert_eq!(words(line(&out, "db-vm")), ["db-vm", "running", "-", "1024/1024", "2", "yes", DB_UUID]);

    let (code, out, err) = run(tandemctl(&agent.url()).args(["domains", "--json"]));
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["domains"][0],
        json!({ "name": "db-vm", "uuid": DB_UUID, "state": "running", "reason": null, "memory_mib": 1024,
                "max_memory_mib": 1024, "vcpus": 2, "persistent": true, "ha": true })
    );

    agent.lease.store(false, Ordering::SeqCst);
    let (code, out, err) = run(tandemctl(&agent.url()).arg("domains"));
    assert_eq!(code, Some(69), "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("this host's lease expired; its VMs are being destroyed"), "{err}");
}

#[test]
fn host_verbs_against_a_guest_agent_say_so() {
    let agent = Agent::plain(false);
    let (code, out, err) = run(tandemctl(&agent.url()).arg("vms"));
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("does not serve the host API (tandem.v1.HostAgent): is it a guest agent?"), "{err}");
    // `status` works against both.
    let (code, out, err) = run(tandemctl(&agent.url()).arg("status"));
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("node hv1 (id 1)"), "{out}");
}

#[test]
fn roles_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let watcher = pki.client_cert("watcher");
    let settings = ApiSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: Some(ApiTls {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_ca: Some(pki.ca_cert.clone()),
        }),
        roles: BTreeMap::from([("watcher".to_string(), vec![ApiRole::Viewer])]),
        anonymous_roles: None,
        insecure: false,
    };
    let agent = Agent::start(settings, true);
    let url = format!("https://localhost:{}", agent.addr.port());
    let with_cert = |c: &mut Command| {
        c.arg("--ca").arg(&pki.ca_cert).arg("--cert").arg(&watcher.cert).arg("--key").arg(&watcher.key);
    };
    let mut c = tandemctl(&url);
    with_cert(&mut c);
    let (code, out, err) = run(c.args(["domains", "--json"]));
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["host"], "hv1");

    let mut c = tandemctl(&url);
    with_cert(&mut c);
    let (code, _, err) = run(c.args(["vm", "stop", "db"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("permission denied") && err.contains("StopVm needs role operator"), "{err}");
    assert!(agent.fake.accepted.lock().unwrap().is_empty());
    let mut c = tandemctl(&url);
    with_cert(&mut c);
    let (code, _, err) = run(c.args(["vm", "dump", "db", "--path", "/tmp/denied.core"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("permission denied") && err.contains("DumpVm needs role operator"), "{err}");

    let (code, _, err) = run(tandemctl(&url).arg("--ca").arg(&pki.ca_cert).arg("hosts"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("GetClusterStatus needs role viewer; the anonymous client has no roles"), "{err}");
}
