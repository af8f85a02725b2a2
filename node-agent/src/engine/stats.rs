//! Process figures for reports: peak resident memory and CPU time.

/// Peak resident set size of this process in bytes (`VmHWM`), where the OS
/// exposes it (Linux `/proc`); `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix("VmHWM:")?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    })
}

/// CPU time (user + system, all threads) this process has used so far, in
/// seconds, where the OS exposes it (Linux `/proc`); `None` elsewhere.
///
/// On a machine shared with other work, CPU seconds per token measure the
/// engine's own cost where wall-clock rates measure the neighbours too.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line, in USER_HZ (100 per second on Linux).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_time_grows_with_work() {
        if cfg!(target_os = "linux") {
            let before = super::process_cpu_seconds().expect("cpu time");
            let started = std::time::Instant::now();
            let mut x = 0u64;
            while started.elapsed().as_millis() < 300 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            assert_ne!(x, 1);
            let after = super::process_cpu_seconds().expect("cpu time");
            assert!(after > before, "{before} -> {after}");
        }
    }

    #[test]
    fn peak_rss_is_known_on_linux() {
        if cfg!(target_os = "linux") {
            let rss = super::peak_rss_bytes().expect("VmHWM");
            assert!(rss > 1024 * 1024, "{rss}");
        }
    }
}
