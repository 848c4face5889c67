//! What every resource needs to run programs: the resource's cgroups (one
//! for the service it starts, one for its short-lived operations), the user
//! to run as, and helpers around `tandem_monitors::exec::run_command`.

use std::ffi::CString;
use std::io;
use std::time::Duration;

use tandem_monitors::exec::{ChildSetup, CommandSpec, RunError, RunOutput};

use super::ResourceError;
use super::cgroup::{self, Cgroup};

/// Upper bound on waiting for the kernel to empty a killed cgroup.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(5);

/// A user to run programs as, resolved once at build time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// The user name.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
    /// Its supplementary groups (including the primary one).
    pub groups: Vec<u32>,
    /// Its home directory (for `HOME`).
    pub home: String,
}

impl RunAs {
    /// Looks `name` up in the user database.
    pub fn lookup(name: &str) -> Result<Self, String> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| format!("cannot look up user {name:?}: {e}"))?
            .ok_or_else(|| format!("user {name:?} does not exist on this node (create it, or fix `user`)"))?;
        let cname = CString::new(name).map_err(|_| format!("user name {name:?} contains NUL"))?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid)
            .map_err(|e| format!("cannot list the groups of user {name:?}: {e}"))?;
        Ok(Self {
            name: name.to_string(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            groups: groups.into_iter().map(|g| g.as_raw()).collect(),
            home: user.dir.display().to_string(),
        })
    }

    /// Switches the calling process to this user. Async-signal-safe.
    fn switch(&self) -> io::Result<()> {
        // SAFETY: setgroups/setgid/setuid are async-signal-safe syscalls; `groups` is
        // a Vec built before the fork and only read here.
        unsafe {
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0
                || libc::setgid(self.gid) != 0
                || libc::setuid(self.uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Where a resource's processes go.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    /// `<group cgroup>/<resource>`, parent of the two below.
    pub root: Option<Cgroup>,
    /// The service a `start` leaves running.
    pub service: Option<Cgroup>,
    /// Operations (`monitor`, `stop`, helper programs): never counted as the service.
    pub ops: Option<Cgroup>,
    /// The user programs run as.
    pub run_as: Option<RunAs>,
}

impl Placement {
    pub(crate) fn new(group_cgroup: Option<&std::path::Path>, resource: &str, run_as: Option<RunAs>) -> Self {
        let root = group_cgroup.map(|g| Cgroup::new(g).child(resource));
        Self {
            service: root.as_ref().map(|r| r.child("service")),
            ops: root.as_ref().map(|r| r.child("ops")),
            root,
            run_as,
        }
    }

    /// Creates the cgroups (if any).
    pub(crate) fn create(&self, id: &str, op: &'static str) -> Result<(), ResourceError> {
        for cg in [&self.service, &self.ops].into_iter().flatten() {
            cg.create().map_err(|e| ResourceError::failed(op, id, error_chain(&e)))?;
        }
        Ok(())
    }

    /// The child setup for the service (`start`).
    pub(crate) fn service_setup(&self) -> Option<ChildSetup> {
        setup(self.service.as_ref(), self.run_as.clone())
    }

    /// The child setup for operations.
    pub(crate) fn ops_setup(&self) -> Option<ChildSetup> {
        setup(self.ops.as_ref(), self.run_as.clone())
    }

    /// Whether the service cgroup has processes; `None` without a cgroup.
    pub(crate) fn service_running(&self) -> Option<Result<bool, cgroup::CgroupError>> {
        self.service.as_ref().map(|c| c.is_populated())
    }

    /// Kills what is left in the service cgroup, logging it as `why`.
    pub(crate) async fn kill_service(&self, id: &str, op: &'static str, why: &str) -> Result<usize, ResourceError> {
        let Some(cg) = &self.service else { return Ok(0) };
        let n = cg.kill(KILL_WAIT).await.map_err(|e| ResourceError::failed(op, id, error_chain(&e)))?;
        if n > 0 {
            tracing::warn!(resource = id, processes = n, cgroup = %cg.path().display(), "{why}: killed {n} process(es) left in the resource's cgroup");
        }
        Ok(n)
    }

    /// Kills stragglers of operations (a monitor that forked and setsid()ed);
    /// the runtime runs one operation at a time, so nothing legitimate is there.
    pub(crate) async fn kill_ops(&self, id: &str) {
        let Some(cg) = &self.ops else { return };
        match cg.kill(KILL_WAIT).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(resource = id, processes = n, "killed {n} process(es) an operation left behind"),
            Err(e) => tracing::warn!(resource = id, error = %error_chain(&e), "cannot clean the operations cgroup"),
        }
    }

    /// Removes the resource's cgroups once empty (after a stop).
    pub(crate) fn remove(&self, id: &str) {
        if let Some(r) = &self.root {
            if let Err(e) = r.remove() {
                tracing::warn!(resource = id, error = %error_chain(&e), "cannot remove the resource's cgroup");
            }
        }
    }
}

fn setup(cg: Option<&Cgroup>, run_as: Option<RunAs>) -> Option<ChildSetup> {
    if cg.is_none() && run_as.is_none() {
        return None;
    }
    let procs = cg.map(|c| c.procs_file());
    // SAFETY: `cgroup::enter` and `RunAs::switch` make only async-signal-safe syscalls
    // on data prepared before the fork. The cgroup comes first: afterwards we may no
    // longer be allowed to write cgroup.procs.
    Some(unsafe {
        ChildSetup::new(move || {
            if let Some(p) = &procs {
                cgroup::enter(p)?;
            }
            if let Some(u) = &run_as {
                u.switch()?;
            }
            Ok(())
        })
    })
}

/// Adds the user's identity variables to a command run as that user.
pub(crate) fn with_user_env(mut spec: CommandSpec, run_as: Option<&RunAs>) -> CommandSpec {
    if let Some(u) = run_as {
        spec = spec.env("USER", &u.name).env("LOGNAME", &u.name).env("HOME", &u.home);
    }
    spec
}

/// An error and its sources on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The first non-empty output line of a run (stdout first, then stderr).
pub(crate) fn first_output_line(out: &RunOutput) -> String {
    for b in [&out.stdout, &out.stderr] {
        if let Some(l) = String::from_utf8_lossy(b).lines().map(str::trim).find(|l| !l.is_empty()) {
            return l.to_string();
        }
    }
    "no output".to_string()
}

/// A run that ended in an exit code or signal, described for an error message.
pub(crate) fn describe_exit(out: &RunOutput) -> String {
    format!("{}: {}", out.termination, first_output_line(out))
}

/// Maps a runner error for `program` into a resource failure.
pub(crate) fn run_failed(op: &'static str, id: &str, e: &RunError) -> ResourceError {
    ResourceError::failed(op, id, error_chain(e))
}
