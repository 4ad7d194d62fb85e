//! End to end: the real `edge-agent` process with `--listen` on loopback classifies the demo
//! stream, takes a signed model from a push, restarts its run on it, and passes probation.

mod fleet_support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use fleet_support::*;
use selfclass_firmware_host::update::client::{push, DeviceClient};
use selfclass_firmware_host::update::protocol::DeviceState;
use selfclass_runtime::bundle::Bundle;

#[test]
fn edge_agent_with_listen_installs_a_pushed_model_and_keeps_classifying() {
    let root = tempfile::tempdir().expect("tempdir");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fashion-mnist.scb");
    let mut bundle = Bundle::load(&shipped).expect("the shipped model");
    let shipped_version = bundle.model_version;
    let new_version = shipped_version + 1;
    fleet_key().sign_bundle(&mut bundle, new_version, "shipped model").expect("sign");
    let signed = bundle.to_bytes().expect("encode");
    let trust = root.path().join("trust");
    write_trust_store(&trust);

    let mut agent = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["--source", "demo", "--fps", "200", "--no-adapt", "--log-level", "info"])
        .arg("--model")
        .arg(&shipped)
        .arg("--state")
        .arg(root.path().join("state"))
        .arg("--events")
        .arg(root.path().join("events.jsonl"))
        .args(["--listen", "127.0.0.1:0", "--device-name", "cam-e2e", "--probation-s", "0.5"])
        .arg("--trust")
        .arg(&trust)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("edge-agent starts");

    // The listener's address comes in the log; the rest of the log is kept for failures.
    let stderr = agent.stderr.take().expect("stderr");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let mut log = Vec::new();
    let address = loop {
        let Ok(line) = received.recv_timeout(Duration::from_secs(60)) else {
            let _ = agent.kill();
            let _ = agent.wait();
            panic!("no update listener in the log:\n{}", log.join("\n"));
        };
        log.push(line.clone());
        if let Some(rest) = line.split("update listener on ").nth(1) {
            break rest.split([',', ' ']).next().expect("address").to_string();
        }
    };

    let mut options = fast_push();
    options.probation_timeout = Duration::from_secs(60);
    let report =
        push("cam-e2e", &address, &fleet_key(), &package(signed, 64 << 10), &options, &|_| {});
    let status =
        DeviceClient::connect("cam-e2e", &address, options.timeouts).and_then(|mut c| c.status());
    let _ = agent.kill();
    let _ = agent.wait();
    while let Ok(line) = received.try_recv() {
        log.push(line);
    }
    let log = log.join("\n");

    assert!(report.succeeded(), "{:?}\n{log}", report.error);
    assert_eq!(
        (report.old_version, report.new_version),
        (Some(shipped_version), Some(new_version))
    );
    let status = status.expect("status");
    assert_eq!(status.state, DeviceState::Running, "{log}");
    assert!(status.health.is_some_and(|h| h.frames_seen > 0), "{status:?}");
    assert!(log.contains("restarting on it"), "{log}");
    assert_eq!(installed_model_loads(&root.path().join("state")), Ok(new_version));
}
