//! End to end: the real `edge-agent` process with `--listen` on loopback classifies the demo
//! stream, takes a signed model from a push, restarts its run on it, and passes probation;
//! and when its adaptation collapses on the new model, the probation fails and the device
//! goes back to the previous model by itself.

mod fleet_support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use fleet_support::*;
use selfclass_firmware_host::update::client::{push, DeviceClient, PushReport};
use selfclass_firmware_host::update::protocol::{DeviceState, DeviceStatus};
use selfclass_runtime::bundle::Bundle;

/// A running `edge-agent` with its update listener, and its log so far.
struct RunningAgent {
    child: Child,
    lines: Receiver<String>,
    log: Vec<String>,
    address: String,
}

impl RunningAgent {
    /// Starts the agent on the demo stream with `--listen 127.0.0.1:0` and waits for the
    /// listener's address in its log.
    fn start(root: &Path, shipped: &Path, run_args: &[&str], probation_s: &str) -> RunningAgent {
        let trust = root.join("trust");
        write_trust_store(&trust);
        let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .args(["--source", "demo", "--log-level", "info"])
            .args(run_args)
            .arg("--model")
            .arg(shipped)
            .arg("--state")
            .arg(root.join("state"))
            .arg("--events")
            .arg(root.join("events.jsonl"))
            .args(["--listen", "127.0.0.1:0", "--device-name", "cam-e2e"])
            .args(["--probation-s", probation_s])
            .arg("--trust")
            .arg(&trust)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("edge-agent starts");
        // The listener's address comes in the log; the rest of the log is kept for failures.
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut log = Vec::new();
        let address = loop {
            let Ok(line) = lines.recv_timeout(Duration::from_secs(60)) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no update listener in the log:\n{}", log.join("\n"));
            };
            log.push(line.clone());
            if let Some(rest) = line.split("update listener on ").nth(1) {
                break rest.split([',', ' ']).next().expect("address").to_string();
            }
        };
        RunningAgent { child, lines, log, address }
    }

    /// Pushes `signed`, reads the status after it, stops the agent; returns its whole log.
    fn push_and_stop(mut self, signed: Vec<u8>) -> (PushReport, Option<DeviceStatus>, String) {
        let mut options = fast_push();
        options.probation_timeout = Duration::from_secs(60);
        let report = push(
            "cam-e2e",
            &self.address,
            &fleet_key(),
            &package(signed, 64 << 10),
            &options,
            &|_| {},
        );
        let status = DeviceClient::connect("cam-e2e", &self.address, options.timeouts)
            .and_then(|mut c| c.status())
            .ok();
        let _ = self.child.kill();
        let _ = self.child.wait();
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
        (report, status, self.log.join("\n"))
    }
}

/// The shipped model, and a copy of it signed as the next version.
fn shipped_and_next() -> (std::path::PathBuf, u64, Vec<u8>) {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fashion-mnist.scb");
    let mut bundle = Bundle::load(&shipped).expect("the shipped model");
    let shipped_version = bundle.model_version;
    fleet_key().sign_bundle(&mut bundle, shipped_version + 1, "shipped model").expect("sign");
    (shipped, shipped_version, bundle.to_bytes().expect("encode"))
}

#[test]
fn edge_agent_with_listen_installs_a_pushed_model_and_keeps_classifying() {
    let root = tempfile::tempdir().expect("tempdir");
    let (shipped, shipped_version, signed) = shipped_and_next();
    let agent = RunningAgent::start(root.path(), &shipped, &["--fps", "200", "--no-adapt"], "0.5");
    let (report, status, log) = agent.push_and_stop(signed);

    assert!(report.succeeded(), "{:?}\n{log}", report.error);
    assert_eq!(
        (report.old_version, report.new_version),
        (Some(shipped_version), Some(shipped_version + 1))
    );
    let status = status.expect("status");
    assert_eq!(status.state, DeviceState::Running, "{log}");
    assert!(status.health.is_some_and(|h| h.frames_seen > 0), "{status:?}");
    assert!(log.contains("restarting on it"), "{log}");
    assert_eq!(installed_model_loads(&root.path().join("state")), Ok(shipped_version + 1));
}

/// An absurd adaptation step size makes the heads collapse on the live stream within a
/// second; the agent's collapse guard reports each restore to the update listener, so the
/// new model fails its probation and the device returns to the shipped one.
#[test]
fn edge_agent_whose_adaptation_collapses_during_probation_goes_back() {
    let root = tempfile::tempdir().expect("tempdir");
    let (shipped, shipped_version, signed) = shipped_and_next();
    let agent = RunningAgent::start(
        root.path(),
        &shipped,
        &["--fps", "500", "--learning-rate", "1000"],
        "4",
    );
    let (report, status, log) = agent.push_and_stop(signed);

    let error = report.error.as_ref().map(|e| e.to_string()).unwrap_or_default();
    assert!(!report.succeeded(), "the collapsing model passed its probation\n{log}");
    assert!(error.contains("collapse guard fired"), "{error}\n{log}");
    assert!(log.contains("adaptation rolled back"), "{log}");
    let status = status.expect("status");
    assert!(
        matches!(&status.state, DeviceState::RolledBack { from_version, .. } if *from_version == shipped_version + 1),
        "{status:?}"
    );
    assert_eq!(installed_model_loads(&root.path().join("state")), Ok(shipped_version));
}
