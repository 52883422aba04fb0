//! What a step cost: wall time, CPU time and peak RSS of the process that
//! did it, and the CPU the cluster's own processes spent meanwhile.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Cost {
    pub wall_s: f64,
    /// User + system CPU of the measured process.
    pub cpu_s: f64,
    /// Peak resident set of the measured process (0 when measured in-process).
    pub peak_rss_mib: f64,
    /// CPU the API server and etcd spent during the step.
    pub server_cpu_s: f64,
}

/// The output of a measured command.
pub struct Run {
    pub cost: Cost,
    pub stdout: Vec<u8>,
}

/// Runs `command` to completion and measures it with wait4(2), which gives
/// the child's own rusage (CPU and peak RSS) without counting anything else.
pub fn command(mut command: Command, server: &ServerProcesses) -> Result<Run> {
    let shown = format!("{command:?}");
    let stdout_file = tempfile::tempfile().context("creating a file for the command's output")?;
    command
        .stdout(stdout_file.try_clone()?)
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let server_before = server.cpu_seconds();
    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    // Drain stderr (progress and logs) while the command runs, so that it never blocks on a full pipe.
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let stderr_reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut text);
        text
    });
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain old data, and wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = started.elapsed();
    if waited != pid {
        bail!("waiting for {shown}: {}", std::io::Error::last_os_error());
    }
    let server_cpu = server.cpu_seconds() - server_before;
    let stderr = stderr_reader.join().unwrap_or_default();
    let exited_ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !exited_ok {
        bail!(
            "{shown} failed (wait status {status}):\n{}",
            String::from_utf8_lossy(&stderr)
        );
    }
    let mut stdout = Vec::new();
    let mut file = stdout_file;
    std::io::Seek::rewind(&mut file)?;
    std::io::Read::read_to_end(&mut file, &mut stdout)?;
    Ok(Run {
        cost: Cost {
            wall_s: wall.as_secs_f64(),
            cpu_s: seconds(usage.ru_utime) + seconds(usage.ru_stime),
            // Linux reports ru_maxrss in KiB.
            peak_rss_mib: usage.ru_maxrss as f64 / 1024.0,
            server_cpu_s: server_cpu,
        },
        stdout,
    })
}

fn seconds(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// CPU (user + system) this process has used so far, all threads.
pub fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills a plain struct for this process.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Measures an in-process step (a baseline) by wall time and this process's CPU.
pub async fn in_process<T, F>(server: &ServerProcesses, step: F) -> Result<(T, Cost)>
where
    F: std::future::Future<Output = Result<T>>,
{
    let server_before = server.cpu_seconds();
    let cpu_before = own_cpu_seconds();
    let started = Instant::now();
    let value = step.await?;
    let wall = started.elapsed();
    Ok((
        value,
        Cost {
            wall_s: wall.as_secs_f64(),
            cpu_s: own_cpu_seconds() - cpu_before,
            peak_rss_mib: 0.0,
            server_cpu_s: server.cpu_seconds() - server_before,
        },
    ))
}

/// The API server and etcd of one cluster, whose CPU each step reports:
/// it shows how much of a step's time the server side needed.
pub struct ServerProcesses {
    pids: Vec<u32>,
}

impl ServerProcesses {
    /// The processes of cluster `dir` of a test environment (pid files
    /// written by scripts/testenv).
    pub fn of_cluster(dir: &Path) -> Result<Self> {
        Self::of_pid_files(&[&dir.join("apiserver.pid"), &dir.join("etcd.pid")])
    }

    /// The processes whose pid files are `files` (MinIO's, say).
    pub fn of_pid_files(files: &[&Path]) -> Result<Self> {
        let mut pids = Vec::new();
        for path in files {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            pids.push(
                text.trim()
                    .parse()
                    .with_context(|| format!("{} holds no pid", path.display()))?,
            );
        }
        Ok(ServerProcesses { pids })
    }

    pub fn none() -> Self {
        ServerProcesses { pids: Vec::new() }
    }

    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
    }

    /// CPU seconds used so far by the processes (children included, which
    /// these servers do not have).
    pub fn cpu_seconds(&self) -> f64 {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        self.pids
            .iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .map(|stat| {
                // Fields after the command name (which may hold spaces): utime is the 14th field overall.
                let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let field = |i: usize| {
                    fields
                        .get(i)
                        .and_then(|f| f.parse::<f64>().ok())
                        .unwrap_or(0.0)
                };
                (field(11) + field(12)) / ticks
            })
            .sum()
    }
}

/// Waits until `servers` use less than `max_cores` of CPU over a few
/// seconds: what a previous step set off (controllers making ReplicaSets
/// and Pods for restored workloads) must not run into the next measurement
/// on a machine with few cores. False when they were still busy after
/// `timeout`: the benchmark goes on, and says so.
pub async fn wait_quiet(
    servers: &ServerProcesses,
    max_cores: f64,
    timeout: std::time::Duration,
) -> Result<bool> {
    let window = std::time::Duration::from_secs(3);
    let started = Instant::now();
    loop {
        let before = servers.cpu_seconds();
        tokio::time::sleep(window).await;
        let cores = (servers.cpu_seconds() - before) / window.as_secs_f64();
        if cores < max_cores {
            return Ok(true);
        }
        if started.elapsed() > timeout {
            return Ok(false);
        }
    }
}

/// The median of several measurements of one step (by wall time).
pub fn median(mut costs: Vec<Cost>) -> Cost {
    costs.sort_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
    costs[costs.len() / 2]
}
