//! SIGKILL at random points of an install, fifty times: the agent always comes back with a
//! model that loads, the old one or the new one.
//!
//! The agent is a real process: this test binary started again with
//! `FLEET_TEST_AGENT_DIR` set runs only [`helper_agent_process`], which serves updates from
//! that directory until it is killed (or for two minutes at most).

mod fleet_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleet_support::*;
use rand::{Rng, SeedableRng};
use selfclass_firmware_host::update::client::{push, DeviceClient};
use selfclass_firmware_host::update::protocol::DeviceState;
use selfclass_firmware_host::update::Probation;

const AGENT_DIR_VAR: &str = "FLEET_TEST_AGENT_DIR";

/// Not a test of its own: the body of the agent process the crash test starts and kills.
/// Run normally (without the variable) it returns at once.
#[test]
fn helper_agent_process() {
    let Ok(dir) = std::env::var(AGENT_DIR_VAR) else { return };
    let dir = PathBuf::from(dir);
    let mut config = agent_config(&dir, "cam-crash", 1);
    config.probation = Probation {
        window: Duration::from_millis(40),
        min_frames: 3,
        max_wait: Duration::from_secs(5),
    };
    let agent = start_agent_with(config, TestHost::new());
    // The parent waits for this file; rename makes it appear complete.
    let port_file = dir.join("port");
    std::fs::write(dir.join("port.tmp"), &agent.address).expect("port file");
    std::fs::rename(dir.join("port.tmp"), &port_file).expect("port file");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

// The child is handed to the caller, which kills and reaps it.
#[allow(clippy::zombie_processes)]
fn start_agent_process(dir: &Path) -> (Child, String) {
    let port_file = dir.join("port");
    let _ = std::fs::remove_file(&port_file);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))
        .expect("log");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["helper_agent_process", "--exact", "--nocapture", "--test-threads=1"])
        .env(AGENT_DIR_VAR, dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("agent process starts");
    let started = Instant::now();
    loop {
        if let Ok(address) = std::fs::read_to_string(&port_file) {
            return (child, address);
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent process did not start; see {}", dir.join("agent.log").display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sigkill_at_random_points_of_an_install_always_leaves_a_model_that_loads() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path();
    let seed: u64 =
        std::env::var("FLEET_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let state_dir = dir.join("cam-crash").join("state");
    let key = fleet_key();
    let (mut child, mut address) = start_agent_process(dir);

    // One undisturbed push to learn how long a whole push takes here.
    let timed = Instant::now();
    let first = push(
        "cam-crash",
        &address,
        &key,
        &package(signed_file("MatMul", 300, 2, &key), 1024),
        &fast_push(),
        &|_| {},
    );
    assert!(first.succeeded(), "{:?}", first.error);
    let full_push = timed.elapsed();

    let (mut kept_old, mut got_new) = (0, 0);
    for round in 0..50 {
        let status = DeviceClient::connect("cam-crash", &address, fast_push().timeouts)
            .and_then(|mut c| c.status())
            .expect("status before the push");
        let old = status.installed.expect("a model").version;
        let new = status.version_floor + 1;
        let package = package(signed_file("MatMul", 300, new, &key), 1024);

        let kill_after = full_push.mul_f64(rng.gen_range(0.0..1.2));
        let pusher = {
            let address = address.clone();
            std::thread::spawn(move || {
                let mut options = fast_push();
                options.attempts = 1;
                push("cam-crash", &address, &fleet_key(), &package, &options, &|_| {})
            })
        };
        std::thread::sleep(kill_after);
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        let _ = pusher.join();

        // Whatever the moment, the file on disk is a whole bundle the engine loads...
        let on_disk = installed_model_loads(&state_dir)
            .unwrap_or_else(|e| panic!("round {round} (killed after {kill_after:?}): {e}"));
        assert!(
            on_disk == old || on_disk == new,
            "round {round}: v{on_disk} is neither v{old} nor v{new}"
        );

        // ...and the restarted agent runs a model that loads, old or new.
        (child, address) = start_agent_process(dir);
        let status = DeviceClient::connect("cam-crash", &address, fast_push().timeouts)
            .and_then(|mut c| c.status())
            .expect("status after the restart");
        let running = status.installed.expect("a model after the restart").version;
        assert!(running == old || running == new, "round {round}: runs v{running}");
        assert!(
            !matches!(status.state, DeviceState::NoModel | DeviceState::Probation { .. }),
            "{status:?}"
        );
        if running == new {
            got_new += 1;
        } else {
            kept_old += 1;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "seed {seed:#x}: 50 kills, {kept_old} came back on the old model, {got_new} on the new one"
    );
    assert_eq!(kept_old + got_new, 50);
}
