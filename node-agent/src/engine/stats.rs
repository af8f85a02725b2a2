//! Process figures for reports: peak resident memory.

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

#[cfg(test)]
mod tests {
    #[test]
    fn peak_rss_is_known_on_linux() {
        if cfg!(target_os = "linux") {
            let rss = super::peak_rss_bytes().expect("VmHWM");
            assert!(rss > 1024 * 1024, "{rss}");
        }
    }
}
