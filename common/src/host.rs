//! This machine's name, for naming a process to other processes (leases, consumer reports).

/// The host's name (from the kernel), or `None` where it cannot be read.
pub fn name() -> Option<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let host = host.trim();
    (!host.is_empty()).then(|| host.to_owned())
}
