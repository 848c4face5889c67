//! `tandemctl probe`: one probe run, Nagios-style exit code, human or JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tandem_monitors::{ProbeResult, ProbeSpec, RunLimits, SecretSource, Status, build_probe, run_probe};

/// Arguments of `tandemctl probe`.
#[derive(Debug, Args)]
#[command(after_help = "\
Targets:
  postgresql://USER@HOST:PORT/DB   http://… https://…   smtp://… smtps://…
  imap://… imaps://…   pop3://… pop3s://…   ftp://[USER@]HOST   oracle://HOST:PORT/SERVICE
  tcp://HOST:PORT   process:///PIDFILE   process://name/COMMAND
  exec -- PROGRAM ARGS…            (any Nagios/monitoring-plugins program)
  ocf:PROVIDER:AGENT --param K=V…  (an OCF resource agent's monitor action)
Probe options (-o KEY=VALUE) are listed in docs/monitors.md.
Exit status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (also for bad arguments).")]
pub struct ProbeArgs {
    /// What to probe: a URL, `exec`, or `ocf:PROVIDER:AGENT`.
    target: String,
    /// For `exec`: the program and its arguments (after `--`).
    #[arg(last = true)]
    program: Vec<String>,
    /// Hard deadline for the whole run, in seconds.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    timeout: f64,
    /// A success slower than this is reported as WARNING.
    #[arg(long, value_name = "SECONDS")]
    warning: Option<f64>,
    /// Probe option, repeatable (e.g. -o starttls=true, -o level=write).
    #[arg(short = 'o', long = "option", value_name = "KEY=VALUE", value_parser = parse_kv)]
    options: Vec<(String, String)>,
    /// OCF parameter (OCF_RESKEY_KEY), repeatable.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_kv)]
    params: Vec<(String, String)>,
    /// Read the password from the first line of this file.
    #[arg(long, value_name = "FILE", conflicts_with = "password_env")]
    password_file: Option<PathBuf>,
    /// Read the password from this environment variable.
    #[arg(long, value_name = "VAR")]
    password_env: Option<String>,
    /// Print one JSON object instead of a human line.
    #[arg(long)]
    json: bool,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn secs(name: &str, v: f64) -> Result<Duration, String> {
    if v.is_finite() && v > 0.0 && v <= 86_400.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!("--{name} must be a number of seconds in (0, 86400], got {v}"))
    }
}

/// Runs the probe and returns its Nagios exit code.
pub fn run(args: ProbeArgs) -> ExitCode {
    match run_inner(&args) {
        Ok((kind, target, result)) => {
            if args.json {
                let mut v = serde_json::to_value(&result).expect("a probe result serialises");
                v["kind"] = kind.into();
                v["target"] = target.into();
                println!("{v}");
            } else {
                println!("{}", human_line(&kind, &target, &result));
            }
            ExitCode::from(result.status.exit_code() as u8)
        }
        Err(msg) => {
            if args.json {
                let v = serde_json::json!({
                    "status": "UNKNOWN", "latency_ms": 0.0, "reason": msg,
                    "failure_class": "config", "perfdata": [],
                });
                println!("{v}");
            } else {
                println!("UNKNOWN - {msg}");
            }
            ExitCode::from(Status::Unknown.exit_code() as u8)
        }
    }
}

fn run_inner(args: &ProbeArgs) -> Result<(String, String, ProbeResult), String> {
    let timeout = secs("timeout", args.timeout)?;
    let warning = args.warning.map(|w| secs("warning", w)).transpose()?;
    if args.target != "exec" && !args.program.is_empty() {
        return Err(format!("arguments after `--` are only for `exec`, not {}", args.target));
    }
    let spec = ProbeSpec {
        target: args.target.clone(),
        args: args.program.clone(),
        params: args.params.iter().cloned().collect::<BTreeMap<_, _>>(),
        options: args.options.iter().cloned().collect::<BTreeMap<_, _>>(),
        limits: RunLimits { timeout, warning },
        password: match (&args.password_file, &args.password_env) {
            (Some(f), _) => Some(SecretSource::File(f.clone())),
            (None, Some(v)) => Some(SecretSource::Env(v.clone())),
            (None, None) => None,
        },
    };
    let probe = build_probe(&spec).map_err(|e| error_chain(&e))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let result = rt.block_on(run_probe(probe.as_ref(), spec.limits));
    Ok((probe.kind().to_string(), probe.target(), result))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

fn human_line(kind: &str, target: &str, r: &ProbeResult) -> String {
    let ms = r.latency.as_secs_f64() * 1000.0;
    let class = r.class.map(|c| format!(" [{c}]")).unwrap_or_default();
    let mut line = format!("{} - {kind} {target}: {} ({ms:.1} ms){class}", r.status, r.reason);
    if !r.perfdata.is_empty() {
        line.push_str(" |");
        for p in &r.perfdata {
            line.push_str(&format!(" '{}'={}{}", p.label, p.value, p.unit));
        }
    }
    line
}
