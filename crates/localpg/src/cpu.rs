//! CPU time used by processes and by a cluster's server, from `/proc` (Linux), for the
//! benchmarks' per-process breakdowns.

use crate::Cluster;

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux everywhere).
const TICKS_PER_SECOND: f64 = 100.0;

/// `(parent pid, own user + system ticks, reaped children's user + system ticks)` of `pid`
/// (a number, or `self`).
fn times(pid: &str) -> Option<(u32, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields start after its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let n = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((n(1)? as u32, n(11)? + n(12)?, n(13)? + n(14)?))
}

/// CPU seconds (user and system) process `pid` (a number, or `self`) has used so far; NaN
/// when it cannot be read.
pub fn process_cpu_seconds(pid: &str) -> f64 {
    times(pid).map_or(f64::NAN, |(_, own, _)| own as f64 / TICKS_PER_SECOND)
}

impl Cluster {
    /// CPU seconds (user and system) the server has used so far: its postmaster, the
    /// postmaster's live children, and the children it has reaped. NaN when the server is not
    /// running.
    pub fn cpu_seconds(&self) -> f64 {
        let Some(postmaster) = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
        else {
            return f64::NAN;
        };
        let mut ticks = times(&postmaster.to_string()).map_or(0, |(_, own, reaped)| own + reaped);
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            if let Some((_, own, _)) = times(pid).filter(|(ppid, ..)| *ppid == postmaster) {
                ticks += own;
            }
        }
        ticks as f64 / TICKS_PER_SECOND
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_used_some_cpu_and_a_missing_one_none() {
        let spent: u64 = (0..20_000_000u64).fold(0, |a, i| a.wrapping_add(i * i));
        assert!(spent > 0);
        let own = process_cpu_seconds("self");
        assert!(own.is_finite() && own >= 0.0, "{own}");
        assert!(process_cpu_seconds("0").is_nan());
    }
}
