//! `tandemctl status|group|monitor|events|shutdown-prepare` as a user runs
//! them: the real binary against a real API server (the guest agent's tonic
//! server on 127.0.0.1, with a small in-test runtime behind its `Control`
//! trait), plaintext and mutual TLS; exit codes 0/1/64/69.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_config::{ApiRole, ApiSettings, ApiTls};
use tandem_guest::api::{BoxFuture, Control, ControlError, OperatorAck, OperatorAction, OperatorRequest, pb};
use tandem_testkit::certs::{TestPki, make_pki};
use tokio::sync::{broadcast, mpsc, oneshot};

/// Generous bound for anything that should be quick.
const BOUND: Duration = Duration::from_secs(20);

struct Fake {
    accepted: Mutex<Vec<OperatorRequest>>,
    standby: Mutex<Vec<Option<tandem_engine::StandbyMode>>>,
    events: broadcast::Sender<pb::Event>,
    safe: bool,
}

fn status() -> pb::GuestStatus {
    pb::GuestStatus {
        node: "alpha".into(),
        node_id: 1,
        quorum: true,
        probing: false,
        self_fenced: false,
        lease: Some(pb::HostLeaseStatus { host_id: 1, valid: true, valid_for_ms: 7_500 }),
        nodes: vec![
            pb::NodeStatus {
                name: "alpha".into(),
                id: 1,
                state: pb::NodeState::Up as i32,
                local: true,
                ..Default::default()
            },
            pb::NodeStatus {
                name: "beta".into(),
                id: 2,
                state: pb::NodeState::Up as i32,
                local: false,
                standby: true,
                standby_mode: 0,
                links: vec![
                    pb::LinkStatus { name: "lan".into(), state: pb::LinkState::Up as i32 },
                    pb::LinkStatus { name: "backup".into(), state: pb::LinkState::Down as i32 },
                ],
            },
        ],
        groups: vec![
            pb::GroupStatus {
                name: "pg".into(),
                state: pb::GroupState::Started as i32,
                location: "alpha".into(),
                restarts: 1,
                failovers: 0,
                resources: vec![
                    pb::ResourceStatus { name: "data".into(), state: pb::ResourceState::Started as i32 },
                    pb::ResourceStatus { name: "postgres".into(), state: pb::ResourceState::Started as i32 },
                ],
                monitors: vec![pb::MonitorStatus {
                    name: "sql".into(),
                    resource: "postgres".into(),
                    state: pb::MonitorState::Active as i32,
                    last_result: Some(pb::ProbeResult {
                        status: pb::ProbeStatus::Ok as i32,
                        latency_us: 2_500,
                        reason: "select 1".into(),
                        failure_class: 0,
                        perfdata: vec![],
                    }),
                    consecutive_failures: 0,
                    last_probe_ms_ago: 1_200,
                    restarts: 1,
                }],
                ..Default::default()
            },
            pb::GroupStatus {
                name: "web".into(),
                state: pb::GroupState::Blocked as i32,
                failovers: 3,
                failed_on: vec!["alpha".into()],
                monitoring_suspended: true,
                not_running: Some(pb::NotRunning {
                    reason: pb::NotRunningReason::WaitingForFence as i32,
                    node: "beta".into(),
                    detail: vec![],
                }),
                ..Default::default()
            },
        ],
    }
}

impl Control for Fake {
    fn status(&self) -> BoxFuture<'_, Result<pb::GuestStatus, ControlError>> {
        Box::pin(async { Ok(status()) })
    }

    fn operator(&self, request: OperatorRequest) -> BoxFuture<'_, Result<OperatorAck, ControlError>> {
        Box::pin(async move {
            if !["pg", "web"].contains(&request.group.as_str()) {
                return Err(ControlError::UnknownGroup(request.group));
            }
            if request.group == "web" && request.action == (OperatorAction::Move { to: None }) {
                // What the runtime answers when no other node can take the group.
                return Err(ControlError::NotPossible(
                    "cannot move group `web`: no other eligible node can take it now (alpha runs it now; beta is in \
                     standby); bring one back (`tandemctl status` shows the nodes) or name a target with --to"
                        .into(),
                ));
            }
            let mut log = self.accepted.lock().unwrap();
            log.push(request);
            Ok(OperatorAck { seq: log.len() as u64 + 100 })
        })
    }

    fn deliver(&self, _seq: u64, _request: OperatorRequest) -> BoxFuture<'_, Result<(), ControlError>> {
        Box::pin(async { Err(ControlError::NotPossible("not used here".into())) })
    }

    fn prepare_shutdown(&self) -> BoxFuture<'_, Result<mpsc::Receiver<pb::ShutdownProgress>, ControlError>> {
        let safe = self.safe;
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(4);
            let group = pb::ShutdownGroupProgress {
                group: "pg".into(),
                action: pb::ShutdownAction::Move as i32,
                to: "beta".into(),
                step: pb::ShutdownStep::Done as i32,
                message: String::new(),
            };
            let blockers = if safe { vec![] } else { vec!["group web could not be stopped".to_string()] };
            let done = pb::ShutdownDone { safe_to_power_off: safe, blockers };
            tx.send(pb::ShutdownProgress { progress: Some(pb::shutdown_progress::Progress::Group(group)) })
                .await
                .unwrap();
            tx.send(pb::ShutdownProgress { progress: Some(pb::shutdown_progress::Progress::Done(done)) })
                .await
                .unwrap();
            Ok(rx)
        })
    }

    fn set_standby(&self, mode: Option<tandem_engine::StandbyMode>) -> BoxFuture<'_, Result<(), ControlError>> {
        self.standby.lock().unwrap().push(mode);
        Box::pin(async { Ok(()) })
    }

    fn subscribe(&self) -> broadcast::Receiver<pb::Event> {
        self.events.subscribe()
    }
}

/// A running API server on its own runtime; stops when dropped.
struct Agent {
    addr: SocketAddr,
    fake: Arc<Fake>,
    stop: Option<oneshot::Sender<()>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Agent {
    fn start(settings: ApiSettings, safe: bool) -> Agent {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let fake = Arc::new(Fake {
            accepted: Mutex::new(Vec::new()),
            standby: Mutex::new(Vec::new()),
            events: broadcast::channel(64).0,
            safe,
        });
        let control: Arc<dyn Control> = fake.clone();
        let bound = rt.block_on(async { tandem_guest::api::ApiServer::new(&settings, control).unwrap().bind().await });
        let bound = bound.unwrap();
        let addr = bound.local_addr();
        let (tx, rx) = oneshot::channel();
        rt.spawn(bound.serve(async move {
            let _ = rx.await;
        }));
        Agent { addr, fake, stop: Some(tx), rt: Some(rt) }
    }

    fn plain(safe: bool) -> Agent {
        Agent::start(ApiSettings { listen: "127.0.0.1:0".parse().unwrap(), ..ApiSettings::default() }, safe)
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

#[test]
fn status_human_and_json() {
    let agent = Agent::plain(true);
    let url = format!("http://{}", agent.addr);
    let (code, out, err) = run(tandemctl(&url).arg("status"));
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("node alpha (id 1)  quorum: yes  lease: host id 1, valid 7.5 s\n"), "{out}");
    let line = |prefix: &str| {
        out.lines().find(|l| l.trim_start().starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?}:\n{out}"))
    };
    let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(words(line("beta")), ["beta", "2", "up", "yes", "lan", "up,", "backup", "down"]);
    assert_eq!(words(line("alpha")), ["alpha", "1", "up", "-", "(this", "node)"]);
    assert_eq!(words(line("pg ")), ["pg", "started", "alpha", "1", "0", "on"]);
    let web = line("web ");
    assert_eq!(words(web)[..6], ["web", "blocked", "-", "0", "3", "suspended"]);
    assert!(web.ends_with("waiting-for-fence (beta); failed on alpha"), "{web}");
    assert!(out.contains("pg     data started, postgres started"), "{out}");
    assert_eq!(
        words(line("pg     sql")),
        ["pg", "sql", "postgres", "active", "0", "OK", "2.5", "ms", "-", "select", "1"]
    );

    let (code, out, err) = run(tandemctl("http://127.0.0.1:1").args(["--endpoint", &url, "status", "--json"]));
    assert_eq!(code, Some(0), "--endpoint overrides TANDEM_ENDPOINT: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["node"], "alpha");
    assert_eq!(v["nodes"][1]["links"][1], serde_json::json!({ "name": "backup", "state": "down" }));
    assert_eq!(
        (&v["nodes"][0]["standby"], &v["nodes"][1]["standby"]),
        (&serde_json::json!(false), &serde_json::json!(true))
    );
    assert_eq!(v["groups"][0]["state"], "started");
    assert_eq!(v["groups"][0]["monitors"][0]["last_result"]["status"], "OK");
    assert_eq!(v["groups"][0]["monitors"][0]["last_result"]["latency_ms"], 2.5);
    assert_eq!(v["groups"][0]["monitors"][0]["restarts"], 1);
    assert_eq!(v["groups"][1]["location"], serde_json::Value::Null);
    assert_eq!(v["groups"][1]["not_running"], serde_json::json!({ "reason": "waiting-for-fence", "node": "beta" }));
    assert_eq!(v["lease"]["valid_for_ms"], 7500);
}

#[test]
fn group_and_monitor_commands() {
    let agent = Agent::plain(true);
    let url = format!("http://{}", agent.addr);
    let (code, out, err) = run(tandemctl(&url).args(["group", "move", "pg", "--to", "beta"]));
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out.trim(), "accepted: move of group pg to beta (command #101); `tandemctl events` shows it happen");
    // Without --to the agent picks the node: the request names none.
    let (code, out, err) = run(tandemctl(&url).args(["group", "move", "pg"]));
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(
        out.trim(),
        "accepted: move of group pg to its best other node (command #102); `tandemctl events` shows it happen"
    );
    for args in [["group", "stop", "web"], ["group", "reset", "web"], ["monitor", "suspend", "pg"]] {
        let (code, out, err) = run(tandemctl(&url).args(args));
        assert_eq!(code, Some(0), "{args:?}: {out}{err}");
    }
    let log: Vec<OperatorRequest> = agent.fake.accepted.lock().unwrap().clone();
    let expect = |g: &str, action| OperatorRequest { group: g.into(), action };
    assert_eq!(
        log,
        vec![
            expect("pg", OperatorAction::Move { to: Some("beta".into()) }),
            expect("pg", OperatorAction::Move { to: None }),
            expect("web", OperatorAction::Stop),
            expect("web", OperatorAction::Reset),
            expect("pg", OperatorAction::SuspendMonitoring),
        ]
    );

    // Refused by the agent: exit 1 and its message.
    let (code, out, err) = run(tandemctl(&url).args(["group", "start", "nope"]));
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("the agent refused (not found): no group named \"nope\""), "{err}");
    // No other node can take it: exit 1 and the agent's reason.
    let (code, out, err) = run(tandemctl(&url).args(["group", "move", "web"]));
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("no other eligible node can take it now (alpha runs it now; beta is in standby)"), "{err}");
    // Usage errors: exit 64, even with global options first.
    let (code, _, err) = run(tandemctl(&url).args(["--timeout", "3", "group", "move"]));
    assert_eq!(code, Some(64), "{err}");
    let (code, _, err) = run(tandemctl(&url).args(["status", "--timeout", "0"]));
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--timeout must be"), "{err}");
    assert_eq!(agent.fake.accepted.lock().unwrap().len(), 5);
}

#[test]
fn events_follow_the_stream_until_ctrl_c() {
    let agent = Agent::plain(true);
    let url = format!("http://{}", agent.addr);
    let mut child = tandemctl(&url).args(["events", "--json"]).stdout(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + BOUND;
    while agent.fake.events.receiver_count() == 0 {
        assert!(Instant::now() < deadline, "tandemctl events never subscribed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let group_event = pb::Event {
        seq: 1,
        unix_ms: 1_700_000_000_000,
        kind: Some(pb::event::Kind::GroupState(pb::GroupStateChanged {
            group: "pg".into(),
            state: pb::GroupState::Started as i32,
            location: "beta".into(),
            not_running: None,
        })),
    };
    let fence_event = pb::Event {
        seq: 2,
        unix_ms: 1_700_000_000_500,
        kind: Some(pb::event::Kind::FenceResult(pb::FenceResult {
            node: "alpha".into(),
            fenced: false,
            message: "fence_virsh timed out".into(),
        })),
    };
    agent.fake.events.send(group_event).unwrap();
    agent.fake.events.send(fence_event).unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["type"], "group-state");
    assert_eq!(
        (first["group"].as_str(), first["state"].as_str(), first["location"].as_str()),
        (Some("pg"), Some("started"), Some("beta"))
    );
    assert_eq!(first["seq"], 1);
    let second: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(second["type"], "fence-result");
    assert_eq!(second["fenced"], false);
    assert_eq!(second["message"], "fence_virsh timed out");

    // Ctrl-C ends it cleanly.
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < BOUND, "tandemctl events ignored SIGINT");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn events_human_lines() {
    let agent = Agent::plain(true);
    let url = format!("http://{}", agent.addr);
    let mut child = tandemctl(&url).arg("events").stdout(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + BOUND;
    while agent.fake.events.receiver_count() == 0 {
        assert!(Instant::now() < deadline, "tandemctl events never subscribed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let notice = pb::Event {
        seq: 3,
        unix_ms: 3_723_004,
        kind: Some(tandem_guest::api::convert::notice(&tandem_engine::Notice::FailoverLimitReached {
            group: tandem_engine::GroupId("web".into()),
            failovers: 3,
        })),
    };
    agent.fake.events.send(notice).unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(
        lines.next().unwrap().unwrap(),
        "01:02:03.004 notice: group web reached its failover limit after 3 failovers; `tandemctl group reset web` \
         releases it"
    );
    // The agent going away ends the command with 69.
    drop(agent);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < BOUND, "tandemctl events outlived the agent");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(69));
}

#[test]
fn shutdown_prepare_shows_progress_and_the_verdict() {
    let agent = Agent::plain(true);
    let url = format!("http://{}", agent.addr);
    let (code, out, err) = run(tandemctl(&url).arg("shutdown-prepare"));
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out, "group pg: move to beta done\nsafe to power off: nothing of the cluster runs on this node\n");

    let agent = Agent::plain(false);
    let url = format!("http://{}", agent.addr);
    let (code, out, err) = run(tandemctl(&url).args(["shutdown-prepare", "--json"]));
    assert_eq!(code, Some(1), "not safe: {out}{err}");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(
        last,
        serde_json::json!({ "type": "done", "safe_to_power_off": false, "blockers": ["group web could not be stopped"] })
    );
}

#[test]
fn unreachable_agent_exits_69_within_the_timeouts() {
    // Nothing listens on this port.
    let port = tandem_testkit::free_port();
    let started = Instant::now();
    let (code, out, err) = run(tandemctl(&format!("http://127.0.0.1:{port}")).arg("status"));
    assert_eq!(code, Some(69), "{out}{err}");
    assert_eq!(err.trim(), format!("tandemctl: cannot reach the agent at http://127.0.0.1:{port}: connection refused"));
    assert!(started.elapsed() < BOUND);

    // Something accepts but never answers: the call timeout bounds the wait.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let started = Instant::now();
    let (code, out, err) =
        run(tandemctl(&url).args(["--timeout", "1", "--connect-timeout", "1", "group", "stop", "pg"]));
    assert_eq!(code, Some(69), "{out}{err}");
    assert!(err.contains(&url), "{err}");
    assert!(started.elapsed() < BOUND, "took {:?}", started.elapsed());
}

fn mtls(pki: &TestPki) -> ApiSettings {
    ApiSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: Some(ApiTls {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_ca: Some(pki.ca_cert.clone()),
        }),
        roles: BTreeMap::from([("watcher".to_string(), vec![ApiRole::Viewer])]),
        anonymous_roles: None,
        insecure: false,
    }
}

#[test]
fn mutual_tls_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let watcher = pki.client_cert("watcher");
    let agent = Agent::start(mtls(&pki), true);
    let url = format!("https://localhost:{}", agent.addr.port());
    let tls = |c: &mut Command| {
        c.arg("--ca").arg(&pki.ca_cert).arg("--cert").arg(&watcher.cert).arg("--key").arg(&watcher.key);
    };

    let mut c = tandemctl(&url);
    tls(&mut c);
    let (code, out, err) = run(c.args(["status", "--json"]));
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["node"], "alpha");

    let mut c = tandemctl(&url);
    tls(&mut c);
    let (code, _, err) = run(c.args(["group", "stop", "pg"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("permission denied") && err.contains("StopGroup needs role operator"), "{err}");
    assert!(agent.fake.accepted.lock().unwrap().is_empty());

    // Without a client certificate: no roles.
    let (code, _, err) = run(tandemctl(&url).arg("--ca").arg(&pki.ca_cert).arg("status"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("anonymous client has no roles"), "{err}");

    // https without --ca, and plaintext against the TLS port.
    let (code, _, err) = run(tandemctl(&url).arg("status"));
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("--ca"), "{err}");
    let (code, _, err) = run(tandemctl(&format!("http://127.0.0.1:{}", agent.addr.port())).arg("status"));
    assert_eq!(code, Some(69), "{err}");
    assert!(err.contains("use an https:// endpoint with --ca"), "{err}");
}

#[test]
fn node_standby_and_online() {
    use tandem_engine::StandbyMode;
    let agent = Agent::plain(true);
    let url = format!("http://{}", agent.addr);
    let (code, out, err) = run(tandemctl(&url).args(["node", "standby", "alpha", "--mode", "park"]));
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("alpha is in standby (park): its groups are stopping"), "{out}");
    let (code, out, err) = run(tandemctl(&url).args(["node", "standby", "alpha", "--mode", "move", "--json"]));
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v, serde_json::json!({ "node": "alpha", "standby": true, "mode": "move" }));
    let (code, out, err) = run(tandemctl(&url).args(["node", "online", "alpha"]));
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out.trim(), "alpha is online: it takes groups again");
    // Another node: refused, naming the node to ask; an unknown one: not found.
    let (code, out, err) = run(tandemctl(&url).args(["node", "online", "beta"]));
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("not possible now") && err.contains("send the request to beta's own API"), "{err}");
    let (code, _, err) = run(tandemctl(&url).args(["node", "online", "gamma"]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not found"), "{err}");
    // A mode is required.
    let (code, _, err) = run(tandemctl(&url).args(["node", "standby", "alpha"]));
    assert_eq!(code, Some(64), "{err}");
    assert_eq!(*agent.fake.standby.lock().unwrap(), vec![Some(StandbyMode::Park), Some(StandbyMode::Move), None]);
}
