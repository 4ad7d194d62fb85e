//! The fleet inventory and staged rollouts over it.
//!
//! A rollout pushes to the canary share of the inventory first (the first devices in file
//! order) and goes on to the rest only if every canary took the model; in the rest it
//! starts no new device once `max_failures` devices failed. Devices within a stage are
//! pushed `parallel` at a time.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::auth::FleetKey;
use super::client::{push, Package, PushOptions, PushPhase};
use super::error::{Result, UpdateError};

/// The inventory file: an optional default signing key and a list of devices.
///
/// ```toml
/// key = "keys/fleet.key"          # relative to this file
///
/// [[device]]
/// name = "cam-entrance"
/// address = "10.0.4.21:7700"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct InventoryFile {
    key: Option<PathBuf>,
    #[serde(default, rename = "device")]
    devices: Vec<DeviceEntry>,
}

/// One device of the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// The name the device was configured with; orders carry it.
    pub name: String,
    /// `host:port` of its update listener.
    pub address: String,
}

/// A checked inventory.
#[derive(Debug, Clone)]
pub struct Inventory {
    pub path: PathBuf,
    /// The signing key the file names, resolved against the file's folder.
    pub key: Option<PathBuf>,
    pub devices: Vec<DeviceEntry>,
}

impl Inventory {
    pub fn load(path: &Path) -> Result<Inventory> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| UpdateError::io(super::error::LOCAL, "reading inventory", path, e))?;
        Inventory::parse(&text, path)
    }

    /// Parses inventory text; `path` names it in errors and anchors the key path.
    pub fn parse(text: &str, path: &Path) -> Result<Inventory> {
        let bad = |reason: String| UpdateError::Inventory { path: path.to_path_buf(), reason };
        let file: InventoryFile = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if file.devices.is_empty() {
            return Err(bad("no [[device]] entries".into()));
        }
        for (i, d) in file.devices.iter().enumerate() {
            if d.name.trim().is_empty() || d.address.trim().is_empty() {
                return Err(bad(format!("device {} has an empty name or address", i + 1)));
            }
            if file.devices[..i].iter().any(|other| other.name == d.name) {
                return Err(bad(format!("device {} is listed twice", d.name)));
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        Ok(Inventory {
            path: path.to_path_buf(),
            key: file.key.map(|k| base.join(k)),
            devices: file.devices,
        })
    }

    /// All devices, or the one named.
    pub fn select(&self, name: Option<&str>) -> Result<Vec<DeviceEntry>> {
        match name {
            None => Ok(self.devices.clone()),
            Some(name) => {
                self.devices.iter().find(|d| d.name == name).map(|d| vec![d.clone()]).ok_or_else(
                    || UpdateError::Inventory {
                        path: self.path.clone(),
                        reason: format!("no device is named {name}"),
                    },
                )
            }
        }
    }
}

/// The shape of a rollout, checked once when built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutPlan {
    canary_percent: u32,
    max_failures: usize,
    parallel: usize,
}

impl RolloutPlan {
    /// `canary_percent` in 0..=100 (0: no canary stage), `max_failures` and `parallel` at
    /// least 1.
    pub fn new(canary_percent: u32, max_failures: usize, parallel: usize) -> Result<RolloutPlan> {
        let bad = |reason: &str| {
            UpdateError::refused(super::error::LOCAL, "rollout plan", reason.to_string())
        };
        if canary_percent > 100 {
            return Err(bad("the canary share is a percentage, 0 to 100"));
        }
        if max_failures == 0 {
            return Err(bad("--max-failures must be at least 1"));
        }
        if parallel == 0 {
            return Err(bad("--parallel must be at least 1"));
        }
        Ok(RolloutPlan { canary_percent, max_failures, parallel })
    }

    /// Canary devices among `devices`: the percentage rounded up, at least one unless the
    /// percentage is 0.
    pub fn canary_count(&self, devices: usize) -> usize {
        if self.canary_percent == 0 {
            return 0;
        }
        (devices * self.canary_percent as usize).div_ceil(100).clamp(1, devices.max(1)).min(devices)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    Canary,
    Rest,
}

/// How a device fared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "result", content = "detail")]
pub enum Outcome {
    Updated,
    AlreadyCurrent,
    Failed(String),
    Skipped(String),
}

impl Outcome {
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Failed(_))
    }
}

/// One row of the final table.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceResult {
    pub device: String,
    pub address: String,
    pub stage: Stage,
    pub old_version: Option<u64>,
    pub new_version: Option<u64>,
    pub outcome: Outcome,
    pub elapsed_ms: u64,
    pub resumed_from_chunk: Option<u32>,
}

/// What a rollout reports while it runs.
#[derive(Debug)]
pub enum RolloutEvent<'a> {
    StageStarted { stage: Stage, devices: usize },
    Phase { device: &'a str, phase: PushPhase },
    Finished(&'a DeviceResult),
    Stopped { reason: String },
}

/// Pushes `package` to `devices` in stages and returns one result per device, in
/// inventory order.
pub fn run_rollout(
    devices: &[DeviceEntry],
    key: &FleetKey,
    package: &Package,
    plan: RolloutPlan,
    options: &PushOptions,
    on_event: &(dyn Fn(RolloutEvent<'_>) + Sync),
) -> Vec<DeviceResult> {
    let (canary, rest) = devices.split_at(plan.canary_count(devices.len()));
    let mut results = Vec::with_capacity(devices.len());
    if !canary.is_empty() {
        on_event(RolloutEvent::StageStarted { stage: Stage::Canary, devices: canary.len() });
        // Within the canary stage every device runs: one canary's failure is the signal.
        results.extend(run_stage(
            canary,
            Stage::Canary,
            usize::MAX,
            key,
            package,
            plan,
            options,
            on_event,
        ));
        let failed: Vec<&str> =
            results.iter().filter(|r| r.outcome.is_failure()).map(|r| r.device.as_str()).collect();
        if !failed.is_empty() {
            let reason = format!("not attempted: canary {} failed", failed.join(", "));
            on_event(RolloutEvent::Stopped { reason: reason.clone() });
            results.extend(rest.iter().map(|d| skipped(d, Stage::Rest, &reason)));
            return results;
        }
    }
    if !rest.is_empty() {
        on_event(RolloutEvent::StageStarted { stage: Stage::Rest, devices: rest.len() });
        results.extend(run_stage(
            rest,
            Stage::Rest,
            plan.max_failures,
            key,
            package,
            plan,
            options,
            on_event,
        ));
    }
    results
}

#[allow(clippy::too_many_arguments)]
fn run_stage(
    devices: &[DeviceEntry],
    stage: Stage,
    max_failures: usize,
    key: &FleetKey,
    package: &Package,
    plan: RolloutPlan,
    options: &PushOptions,
    on_event: &(dyn Fn(RolloutEvent<'_>) + Sync),
) -> Vec<DeviceResult> {
    let next = AtomicUsize::new(0);
    let failures = AtomicUsize::new(0);
    let slots: Mutex<Vec<Option<DeviceResult>>> = Mutex::new(vec![None; devices.len()]);
    let stop_reason =
        format!("not attempted: {max_failures} device(s) failed, the --max-failures limit");
    std::thread::scope(|scope| {
        for _ in 0..plan.parallel.min(devices.len()) {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                let Some(entry) = devices.get(index) else { return };
                let result = if failures.load(Ordering::SeqCst) >= max_failures {
                    skipped(entry, stage, &stop_reason)
                } else {
                    let started = Instant::now();
                    let report =
                        push(&entry.name, &entry.address, key, package, options, &|phase| {
                            on_event(RolloutEvent::Phase { device: &entry.name, phase });
                        });
                    let outcome = match &report.error {
                        Some(e) => {
                            failures.fetch_add(1, Ordering::SeqCst);
                            Outcome::Failed(e.to_string())
                        }
                        None if report.already_current => Outcome::AlreadyCurrent,
                        None => Outcome::Updated,
                    };
                    DeviceResult {
                        device: entry.name.clone(),
                        address: entry.address.clone(),
                        stage,
                        old_version: report.old_version,
                        new_version: report.new_version,
                        outcome,
                        elapsed_ms: started.elapsed().as_millis() as u64,
                        resumed_from_chunk: report.resumed_from_chunk,
                    }
                };
                on_event(RolloutEvent::Finished(&result));
                slots.lock().unwrap_or_else(|p| p.into_inner())[index] = Some(result);
            });
        }
    });
    let slots = slots.into_inner().unwrap_or_else(|p| p.into_inner());
    slots
        .into_iter()
        .zip(devices)
        .map(|(slot, entry)| slot.unwrap_or_else(|| skipped(entry, stage, "not attempted")))
        .collect()
}

fn skipped(entry: &DeviceEntry, stage: Stage, reason: &str) -> DeviceResult {
    DeviceResult {
        device: entry.name.clone(),
        address: entry.address.clone(),
        stage,
        old_version: None,
        new_version: None,
        outcome: Outcome::Skipped(reason.to_string()),
        elapsed_ms: 0,
        resumed_from_chunk: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_share_rounds_up_and_keeps_one() {
        let plan = |p| RolloutPlan::new(p, 1, 4).expect("plan");
        assert_eq!(plan(10).canary_count(20), 2);
        assert_eq!(plan(10).canary_count(3), 1);
        assert_eq!(plan(0).canary_count(3), 0);
        assert_eq!(plan(100).canary_count(3), 3);
        assert_eq!(plan(50).canary_count(0), 0);
        assert!(RolloutPlan::new(101, 1, 1).is_err());
        assert!(RolloutPlan::new(10, 0, 1).is_err());
    }

    #[test]
    fn an_inventory_names_its_faults() {
        let path = Path::new("/srv/fleet/devices.toml");
        let ok = Inventory::parse(
            "key = \"fleet.key\"\n[[device]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n",
            path,
        )
        .expect("parse");
        assert_eq!(ok.key.as_deref(), Some(Path::new("/srv/fleet/fleet.key")));
        let twice = "[[device]]\nname = \"a\"\naddress = \"x:1\"\n[[device]]\nname = \"a\"\naddress = \"y:1\"\n";
        let err = Inventory::parse(twice, path).unwrap_err().to_string();
        assert!(err.contains("devices.toml") && err.contains("listed twice"), "{err}");
        let err = Inventory::parse("[[device]]\nname = \"a\"\n", path).unwrap_err().to_string();
        assert!(err.contains("address"), "{err}");
    }
}
