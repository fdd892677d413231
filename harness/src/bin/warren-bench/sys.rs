//! What the bench reads from `/proc`: CPU time of a process (and of each thread of its own),
//! resident memory, the machine and how busy it is.

use std::time::Instant;

/// Clock ticks per second of `/proc/PID/stat` times (`getconf CLK_TCK`).
fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime in seconds from the text of a `/proc/.../stat` file.
fn stat_cpu_secs(text: &str) -> Option<f64> {
    // The command name (field 2) may contain spaces and parentheses: fields restart after the
    // last ')'. utime and stime are fields 14 and 15, i.e. 12th and 13th after the name.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / clk_tck())
}

/// CPU seconds (user + system, every thread, including exited ones) of a process.
pub(crate) fn process_cpu_secs(pid: u32) -> Option<f64> {
    stat_cpu_secs(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU seconds of a process to the nanosecond: the sum over its live threads of
/// `/proc/PID/task/TID/schedstat` (time on a CPU), or `None` when that is unavailable. Time
/// of threads that ended is missing, so this suits long-lived processes (a broker) over a
/// short window, where the 10 ms ticks of [`process_cpu_secs`] are too coarse.
pub(crate) fn process_cpu_secs_fine(pid: u32) -> Option<f64> {
    let mut total_ns: u64 = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        total_ns += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total_ns as f64 / 1e9)
}

/// CPU seconds of this process.
pub(crate) fn own_cpu_secs() -> f64 {
    process_cpu_secs(std::process::id()).unwrap_or(0.0)
}

/// CPU seconds of each live thread of this process, by thread id.
pub(crate) fn own_thread_cpu_secs() -> Vec<(u32, f64)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let entry = entry.ok()?;
        let tid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let text = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        Some((tid, stat_cpu_secs(&text)?))
    })
    .collect()
}

/// Resident set size (`VmRSS`) of a process in KiB.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// This process's resident set size in KiB.
pub(crate) fn own_rss_kib() -> u64 {
    rss_kib(std::process::id()).unwrap_or(0)
}

/// The process listening on a local TCP port (IPv4 or IPv6), found through the socket's inode
/// in `/proc/net/tcp*` and the processes' file descriptors; with its command name.
pub(crate) fn find_listener(port: u16) -> Option<(u32, String)> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... uid timeout inode
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let listening = *state == "0A";
            let on_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if listening && on_port {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if inodes.iter().any(|i| link.as_os_str() == i.as_str()) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|c| c.trim().to_owned())
                    .unwrap_or_default();
                return Some((pid, comm));
            }
        }
    }
    None
}

/// A CPU snapshot around one measured window: this process (whole and per thread), the
/// broker process if there is one, and the whole machine.
#[derive(Debug, Clone)]
pub(crate) struct CpuSnapshot {
    at: Instant,
    own: f64,
    threads: Vec<(u32, f64)>,
    broker: Option<f64>,
    machine_busy: Option<f64>,
}

/// CPU used during a window.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuUse {
    /// Wall-clock seconds of the window.
    pub(crate) wall: f64,
    /// CPU seconds of the bench process (client; in embedded mode also the broker).
    pub(crate) own: f64,
    /// CPU seconds of its busiest thread.
    pub(crate) busiest_thread: f64,
    /// CPU seconds of the broker process, when it is another process on this machine.
    pub(crate) broker: Option<f64>,
    /// CPU seconds the whole machine spent outside idle (all processes).
    pub(crate) machine: Option<f64>,
}

impl CpuSnapshot {
    /// Takes a snapshot; `broker` is the broker's pid, if it is another local process.
    pub(crate) fn take(broker: Option<u32>) -> Self {
        Self {
            threads: own_thread_cpu_secs(),
            own: own_cpu_secs(),
            broker: broker
                .and_then(|pid| process_cpu_secs_fine(pid).or_else(|| process_cpu_secs(pid))),
            machine_busy: machine_busy_secs(),
            at: Instant::now(),
        }
    }

    /// What was used since `self`, up to `later`.
    pub(crate) fn until(&self, later: &CpuSnapshot) -> CpuUse {
        let busiest_thread = later
            .threads
            .iter()
            .map(|(tid, secs)| {
                let before = self
                    .threads
                    .iter()
                    .find(|(t, _)| t == tid)
                    .map_or(0.0, |(_, s)| *s);
                secs - before
            })
            .fold(0.0, f64::max);
        CpuUse {
            wall: later.at.duration_since(self.at).as_secs_f64(),
            own: later.own - self.own,
            busiest_thread,
            broker: match (self.broker, later.broker) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            },
            machine: match (self.machine_busy, later.machine_busy) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            },
        }
    }
}

/// Non-idle CPU seconds of the whole machine since boot, from `/proc/stat`.
pub(crate) fn machine_busy_secs() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice: guest time is already
    // counted in user.
    let busy: u64 = fields
        .iter()
        .enumerate()
        .filter(|(i, _)| !matches!(i, 3 | 4 | 8 | 9))
        .map(|(_, v)| v)
        .sum();
    Some(busy as f64 / clk_tck())
}

/// The 1-minute load average.
pub(crate) fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A one-line description of the machine: CPU model, CPUs, memory, kernel.
pub(crate) fn machine_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    format!("{cpus} x {model}, {mem_gib:.0} GiB RAM, Linux {kernel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_tricky_name() {
        let text = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        let secs = stat_cpu_secs(text).unwrap();
        assert!((secs - 300.0 / clk_tck()).abs() < 1e-9);
    }

    #[test]
    fn own_figures_are_readable() {
        assert!(own_rss_kib() > 0);
        assert!(!own_thread_cpu_secs().is_empty());
        assert!(machine_busy_secs().is_some());
        let fine = process_cpu_secs_fine(std::process::id()).unwrap();
        let coarse = process_cpu_secs(std::process::id()).unwrap();
        assert!(fine >= 0.0 && coarse >= 0.0);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(
            find_listener(port).map(|(pid, _)| pid),
            Some(std::process::id())
        );
    }
}
