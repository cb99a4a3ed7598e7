//! The process's peak resident memory, which each reconciliation run records
//! (Linux: `VmHWM`, reset at the start of a run where the kernel allows).

/// Starts a new peak measurement; false where the kernel does not allow it,
/// and the peak then covers the process's whole life.
pub fn reset_peak() -> bool {
    // Writing 5 to clear_refs resets the peak RSS (Linux 4.0+).
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident memory in bytes since the last reset, where known.
pub fn peak_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|kib| kib * 1024)
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_peak_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(super::peak_bytes().unwrap() > 0);
        }
    }
}
