//! `tandem-host validate`: the configuration checks plus what only a host cluster needs,
//! every problem reported at once, exit status 78 on any.

use std::process::Command;

fn validate(dir: &std::path::Path, toml: &str) -> (Option<i32>, String, String) {
    let path = dir.join("host.toml");
    std::fs::write(&path, toml).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_tandem-host")).arg("validate").arg("--config").arg(&path).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn base(dir: &std::path::Path) -> String {
    std::fs::write(dir.join("key"), "0123456789abcdef0123456789abcdef\n").unwrap();
    format!(
        "[cluster]\nname = \"v\"\nkey_file = \"{d}/key\"\n\n[[link]]\nname = \"lan\"\nport = 7700\n\n\
         [lease]\ndevice = \"{d}/lease\"\n\n\
         [[node]]\nname = \"h1\"\nid = 1\nlinks = {{ lan = \"10.0.0.1\" }}\nhypervisor = \"test://{d}/h1.xml\"\n\
         fence = {{ kind = \"lease-watchdog-only\" }}\ncapacity = {{ memory_mib = 1024, vcpus = 2 }}\n\n\
         [[node]]\nname = \"h2\"\nid = 2\nlinks = {{ lan = \"10.0.0.2\" }}\n\
         fence = {{ kind = \"lease-watchdog-only\" }}\ncapacity = {{ memory_mib = 1024, vcpus = 2 }}\n\n",
        d = dir.display()
    )
}

fn domain(dir: &std::path::Path, name: &str, uuid: Option<&str>, mib: u64) -> String {
    let path = dir.join(format!("{name}.xml"));
    let uuid = uuid.map(|u| format!("<uuid>{u}</uuid>")).unwrap_or_default();
    std::fs::write(
        &path,
        format!(
            "<domain type='test'><name>{name}</name>{uuid}<memory unit='MiB'>{mib}</memory><vcpu>1</vcpu></domain>"
        ),
    )
    .unwrap();
    path.display().to_string()
}

fn group(name: &str, domain: &str) -> String {
    format!(
        "[[group]]\nname = \"{name}\"\nnodes = [\"h1\", \"h2\"]\n\n[[group.resource]]\nname = \"vm\"\nkind = \"vm\"\ndomain = \"{domain}\"\n\n"
    )
}

#[test]
fn every_host_cluster_problem_is_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut toml = base(d);
    toml += &group("big", &domain(d, "big", Some("11111111-1111-4111-8111-111111111111"), 4096));
    toml += &group("nouuid", &domain(d, "nouuid", None, 256));
    toml += &group("twin", &domain(d, "twin", Some("11111111-1111-4111-8111-111111111111"), 256));
    toml += "[[group]]\nname = \"app\"\nnodes = [\"h1\"]\n\n[[group.resource]]\nname = \"run\"\nkind = \"exec\"\n\
             mode = \"simple\"\nstart = [\"/bin/true\"]\n";
    let (code, out, err) = validate(d, &toml);
    assert_eq!(code, Some(78), "{out}{err}");
    for expected in [
        "node `h2` has no `hypervisor`",
        "group `big` needs 4096 MiB and 1 vCPUs",
        "group `nouuid`, resource `vm`",
        "uuid",
        "groups `big` and `twin` define the same domain UUID",
        "group `app` must hold exactly one resource of kind \"vm\"",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

#[test]
fn a_good_host_cluster_validates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut toml = base(d).replace(
        "[[node]]\nname = \"h2\"\nid = 2\nlinks = { lan = \"10.0.0.2\" }\n",
        &format!(
            "[[node]]\nname = \"h2\"\nid = 2\nlinks = {{ lan = \"10.0.0.2\" }}\nhypervisor = \"test://{}/h2.xml\"\n",
            d.display()
        ),
    );
    toml += &group("web", &domain(d, "web", Some("22222222-2222-4222-8222-222222222222"), 512));
    let (code, out, err) = validate(d, &toml);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("ok: cluster `v`, 2 hosts, 1 HA VMs"), "{out}");
}

#[test]
fn the_lab_configuration_validates_once_its_paths_are_filled_in() {
    // What scripts/host-lab.sh does: copy examples/lab and replace @LAB@.
    let dir = tempfile::tempdir().unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/lab");
    std::fs::create_dir(dir.path().join("vms")).unwrap();
    for entry in std::fs::read_dir(src.join("vms")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join("vms").join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(dir.path().join("cluster.key"), "0123456789abcdef0123456789abcdef\n").unwrap();
    let toml =
        std::fs::read_to_string(src.join("host.toml")).unwrap().replace("@LAB@", &dir.path().display().to_string());
    let (code, out, err) = validate(dir.path(), &toml);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("3 hosts, 6 HA VMs"), "{out}");
}
