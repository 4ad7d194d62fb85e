//! A description of the machine and the software measured, for the report.

use std::process::Command;

/// `key: value` lines describing this machine and the versions in play.
pub fn describe(root: &std::path::Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
        .map_or("unknown".to_string(), |(_, v)| v.trim().to_string());
    out.push(("CPU".into(), model));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    out.push(("cores available".into(), cores.to_string()));
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let Some(kib) = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
    {
        out.push(("memory".into(), format!("{:.1} GiB", kib / 1024.0 / 1024.0)));
    }
    if let Ok(kernel) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        out.push(("Linux".into(), kernel.trim().to_string()));
    }
    if let Some(v) = command_output("rustc", &["-V"]) {
        out.push(("rustc".into(), v));
    }
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap_or_default();
    for krate in ["tract-onnx", "ndarray"] {
        if let Some(v) = locked_version(&lock, krate) {
            out.push((krate.into(), v));
        }
    }
    out
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The version of `krate` in a Cargo.lock (the first, when several are locked).
pub fn locked_version(lock: &str, krate: &str) -> Option<String> {
    let needle = format!("name = \"{krate}\"");
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == needle {
            let version = lines.next()?.trim().strip_prefix("version = ")?;
            return Some(version.trim_matches('"').to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_locked_version() {
        let lock = "[[package]]\nname = \"tract-onnx\"\nversion = \"0.23.9\"\n";
        assert_eq!(locked_version(lock, "tract-onnx").as_deref(), Some("0.23.9"));
        assert_eq!(locked_version(lock, "tract-core"), None);
    }

    #[test]
    fn describes_at_least_the_cores() {
        let d = describe(std::path::Path::new("/nonexistent"));
        assert!(d.iter().any(|(k, v)| k == "cores available" && v != "0"));
    }
}
