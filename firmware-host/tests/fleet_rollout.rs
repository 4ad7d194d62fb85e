//! Rollouts over many real agents on loopback: everyone updated, a failing canary stopping
//! the rest, the failure limit, and the `fleet` program end to end.

mod fleet_support;

use std::process::Command;
use std::time::Instant;

use fleet_support::*;
use selfclass_firmware_host::update::client::DeviceClient;
use selfclass_firmware_host::update::protocol::DeviceState;
use selfclass_firmware_host::update::rollout::{
    run_rollout, DeviceEntry, Outcome, RolloutPlan, Stage,
};

fn entries(agents: &[TestAgent]) -> Vec<DeviceEntry> {
    agents
        .iter()
        .map(|a| DeviceEntry { name: a.name.clone(), address: a.address.clone() })
        .collect()
}

#[test]
fn a_push_to_twenty_four_agents_at_once_updates_every_one() {
    let root = tempfile::tempdir().expect("tempdir");
    let agents: Vec<TestAgent> =
        (0..24).map(|i| start_agent(root.path(), &format!("cam-{i:02}"), 1)).collect();
    let package = package(good_file(2), 1024);
    let plan = RolloutPlan::new(10, 1, 24).expect("plan");

    let started = Instant::now();
    let results =
        run_rollout(&entries(&agents), &fleet_key(), &package, plan, &fast_push(), &|_| {});
    eprintln!("24 devices in {:.2} s", started.elapsed().as_secs_f32());

    assert_eq!(results.len(), 24);
    assert_eq!(
        results.iter().filter(|r| r.stage == Stage::Canary).count(),
        3,
        "10% of 24, rounded up"
    );
    for (result, agent) in results.iter().zip(&agents) {
        assert_eq!(result.outcome, Outcome::Updated, "{}", result.device);
        assert_eq!((result.old_version, result.new_version), (Some(1), Some(2)));
        // Each device reports the new version itself, and runs it.
        let status = agent.server.status();
        assert_eq!(status.installed.map(|m| m.version), Some(2));
        assert_eq!(status.previous.map(|m| m.version), Some(1));
        assert_eq!(status.state, DeviceState::Running);
        assert_eq!(status.version_floor, 2);
        assert_eq!(agent.host.active_version(), Some(2));
        assert_eq!(installed_model_loads(&agent.state_dir), Ok(2));
    }
}

#[test]
fn a_rollout_whose_canary_fails_stops_before_the_rest() {
    let root = tempfile::tempdir().expect("tempdir");
    let agents: Vec<TestAgent> =
        (0..8).map(|i| start_agent(root.path(), &format!("cam-{i}"), 4)).collect();
    // The first device (the canary at 10%) collapses on the new model.
    agents[0].host.collapse_on(5);
    let package = package(good_file(5), 1024);
    let plan = RolloutPlan::new(10, 3, 4).expect("plan");

    let results =
        run_rollout(&entries(&agents), &fleet_key(), &package, plan, &fast_push(), &|_| {});

    assert_eq!(results[0].stage, Stage::Canary);
    match &results[0].outcome {
        Outcome::Failed(reason) => {
            assert!(reason.starts_with("cam-0:"), "{reason}");
            assert!(reason.contains("collapse guard fired"), "{reason}");
            assert!(reason.contains("went back to v4"), "{reason}");
        }
        other => panic!("the canary should have failed: {other:?}"),
    }
    assert_eq!(agents[0].server.status().installed.map(|m| m.version), Some(4));
    for (result, agent) in results[1..].iter().zip(&agents[1..]) {
        assert_eq!(result.outcome, Outcome::Skipped("not attempted: canary cam-0 failed".into()));
        // Nothing reached these devices: no transfer, no new floor.
        let status = agent.server.status();
        assert_eq!(status.installed.map(|m| m.version), Some(4));
        assert_eq!(status.version_floor, 4);
        assert_eq!(status.transfer, None);
    }
}

#[test]
fn the_failure_limit_stops_starting_new_devices() {
    let root = tempfile::tempdir().expect("tempdir");
    let agents: Vec<TestAgent> =
        (0..5).map(|i| start_agent(root.path(), &format!("cam-{i}"), 1)).collect();
    agents[0].host.collapse_on(2);
    agents[1].host.collapse_on(2);
    let package = package(good_file(2), 1024);
    // No canary, one device at a time, stop after two failures.
    let plan = RolloutPlan::new(0, 2, 1).expect("plan");

    let results =
        run_rollout(&entries(&agents), &fleet_key(), &package, plan, &fast_push(), &|_| {});

    assert!(results[0].outcome.is_failure() && results[1].outcome.is_failure());
    for result in &results[2..] {
        assert!(
            matches!(&result.outcome, Outcome::Skipped(r) if r.contains("--max-failures")),
            "{result:?}"
        );
    }
    assert_eq!(agents[4].server.status().installed.map(|m| m.version), Some(1));
}

#[test]
fn the_fleet_program_signs_pushes_reports_and_rolls_back() {
    let root = tempfile::tempdir().expect("tempdir");
    let fleet = env!("CARGO_BIN_EXE_fleet");
    let run = |args: &[&str]| {
        let out = Command::new(fleet).args(args).output().expect("fleet runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // A fresh key; the devices trust it (and the tests' key, which does not matter here).
    let prefix = root.path().join("keys").join("ops");
    std::fs::create_dir_all(prefix.parent().expect("parent")).expect("keys dir");
    let (code, _, err) = run(&["keygen", "--out", prefix.to_str().expect("utf-8")]);
    assert_eq!(code, Some(0), "{err}");
    let public = std::fs::read_to_string(prefix.with_extension("pub")).expect("public key");

    let agents: Vec<TestAgent> = (0..3)
        .map(|i| {
            let config = agent_config(root.path(), &format!("cam-{i}"), 1);
            std::fs::write(config.trust_dir.join("ops.pub"), &public).expect("trust the new key");
            start_agent_with(config, TestHost::new())
        })
        .collect();
    let mut inventory = String::from("key = \"keys/ops.key\"\n");
    for a in &agents {
        inventory.push_str(&format!(
            "\n[[device]]\nname = \"{}\"\naddress = \"{}\"\n",
            a.name, a.address
        ));
    }
    let inventory_path = root.path().join("devices.toml");
    std::fs::write(&inventory_path, inventory).expect("inventory");
    let inv = inventory_path.to_str().expect("utf-8");

    let model = root.path().join("model.scb");
    tiny_bundle("MatMul", 0).save(&model).expect("unsigned bundle");
    let model_arg = model.to_str().expect("utf-8");

    // Unsigned: the tool refuses before contacting anyone.
    let (code, _, err) = run(&["push", "--model", model_arg, "--inventory", inv]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unsigned"), "{err}");

    let (code, out, err) = run(&[
        "sign",
        "--key",
        prefix.with_extension("key").to_str().expect("utf-8"),
        "--model",
        model_arg,
        "--version",
        "7",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("version 7"), "{out}");

    let (code, out, err) =
        run(&["push", "--model", model_arg, "--inventory", inv, "--canary", "34", "--json"]);
    assert_eq!(code, Some(0), "stdout {out}\nstderr {err}");
    assert!(err.contains("canary stage: 2 device(s)"), "{err}");
    let results: serde_json::Value = serde_json::from_str(&out).expect("JSON results");
    let rows = results.as_array().expect("array");
    assert_eq!(rows.len(), 3);
    for row in rows {
        assert_eq!(row["outcome"]["result"], "updated", "{row}");
        assert_eq!(row["old_version"], 1);
        assert_eq!(row["new_version"], 7);
    }

    let (code, out, err) = run(&["status", "--inventory", inv]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("DEVICE"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.contains("v7") && l.contains("running")).count(),
        3,
        "{out}"
    );

    let (code, out, err) =
        run(&["rollback", "--inventory", inv, "--device", "cam-1", "--reason", "test"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.lines().any(|l| l.starts_with("cam-1") && l.contains("v7") && l.contains("v1")),
        "{out}"
    );
    assert_eq!(agents[1].server.status().installed.map(|m| m.version), Some(1));
    assert_eq!(agents[0].server.status().installed.map(|m| m.version), Some(7));

    let (code, out, _) = run(&["status", "--inventory", inv, "--device", "cam-1", "--json"]);
    assert_eq!(code, Some(0));
    let rows: serde_json::Value = serde_json::from_str(&out).expect("JSON status");
    assert_eq!(rows[0]["installed_version"], 1);
    assert_eq!(rows[0]["version_floor"], 7);
    assert!(rows[0]["state"].as_str().is_some_and(|s| s.contains("rolled back from v7")), "{rows}");

    // Going back to 7 on cam-1 needs a new version: the floor holds.
    let mut client =
        DeviceClient::connect("cam-1", &agents[1].address, fast_push().timeouts).expect("connect");
    assert_eq!(client.status().expect("status").version_floor, 7);
}
