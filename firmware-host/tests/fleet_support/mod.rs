//! Shared pieces of the fleet tests: small real bundles, keys, and agents that serve the
//! update protocol on loopback with a real frame loop running the installed model.

#![allow(dead_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ndarray::Array4;
use selfclass_firmware_host::update::client::{Package, PushOptions, Timeouts};
use selfclass_firmware_host::update::{
    hex, FleetKey, Health, ModelHost, Probation, UpdateConfig, UpdateServer,
};
use selfclass_runtime::backbone::Backbone;
use selfclass_runtime::bundle::Bundle;
pub use selfclass_runtime::testing::tiny_bundle;

/// The key the test devices trust.
pub fn fleet_key() -> FleetKey {
    FleetKey::from_seed([0x5a; 32])
}

/// A key no test device trusts.
pub fn stranger_key() -> FleetKey {
    FleetKey::from_seed([0xc3; 32])
}

/// File bytes of a bundle signed with `key` as `version`.
pub fn signed_file(op: &str, anchor_rows: usize, version: u64, key: &FleetKey) -> Vec<u8> {
    let mut bundle = tiny_bundle(op, anchor_rows);
    key.sign_bundle(&mut bundle, version, "test bundle").expect("sign");
    bundle.to_bytes().expect("encode")
}

/// File bytes of a good bundle signed by the fleet key.
pub fn good_file(version: u64) -> Vec<u8> {
    signed_file("MatMul", 0, version, &fleet_key())
}

pub fn package(bytes: Vec<u8>, chunk_bytes: u32) -> Package {
    Package::from_bytes(bytes, chunk_bytes, "test bundle").expect("package")
}

/// Push options scaled for loopback tests.
pub fn fast_push() -> PushOptions {
    PushOptions {
        timeouts: Timeouts { connect: Duration::from_secs(2), io: Duration::from_secs(20) },
        attempts: 5,
        retry_delay: Duration::from_millis(20),
        probation_timeout: Duration::from_secs(30),
        poll_interval: Duration::from_millis(20),
    }
}

pub fn short_probation() -> Probation {
    Probation {
        window: Duration::from_millis(150),
        min_frames: 5,
        max_wait: Duration::from_secs(5),
    }
}

/// Writes a trust store holding the fleet key.
pub fn write_trust_store(dir: &Path) {
    std::fs::create_dir_all(dir).expect("trust dir");
    std::fs::write(
        dir.join("fleet.pub"),
        format!("# test fleet key\n{}\n", hex(&fleet_key().public_key())),
    )
    .expect("trust key");
}

/// A stand-in for edge-agent's frame loop: it runs the active model on a frame every
/// millisecond or two and counts frames; versions listed in `collapsing` make it report a
/// collapse-guard event after a few frames, as a model whose classes collapse would.
pub struct TestHost {
    shared: Arc<HostShared>,
}

struct HostShared {
    model: Mutex<Option<(u64, Backbone)>>,
    frames: AtomicU64,
    collapses: AtomicU64,
    collapsing: Mutex<HashSet<u64>>,
    activations: Mutex<Vec<u64>>,
    stop: AtomicBool,
}

impl TestHost {
    pub fn new() -> Arc<TestHost> {
        let shared = Arc::new(HostShared {
            model: Mutex::new(None),
            frames: AtomicU64::new(0),
            collapses: AtomicU64::new(0),
            collapsing: Mutex::new(HashSet::new()),
            activations: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let frame_loop = Arc::clone(&shared);
        std::thread::spawn(move || {
            let frame = Array4::<f32>::zeros((1, 1, 4, 4));
            let mut frames_of_version = 0u64;
            let mut last_version = 0;
            while !frame_loop.stop.load(Ordering::SeqCst) {
                let ran = {
                    let model = frame_loop.model.lock().expect("model lock");
                    model.as_ref().map(|(version, net)| {
                        net.embed(frame.view()).expect("a frame runs");
                        *version
                    })
                };
                if let Some(version) = ran {
                    frame_loop.frames.fetch_add(1, Ordering::SeqCst);
                    frames_of_version =
                        if version == last_version { frames_of_version + 1 } else { 1 };
                    last_version = version;
                    let collapsing = frame_loop.collapsing.lock().expect("lock").contains(&version);
                    if collapsing && frames_of_version == 3 {
                        frame_loop.collapses.fetch_add(1, Ordering::SeqCst);
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Arc::new(TestHost { shared })
    }

    /// Makes `version` collapse when it runs.
    pub fn collapse_on(&self, version: u64) {
        self.shared.collapsing.lock().expect("lock").insert(version);
    }

    /// Versions activated so far, in order.
    pub fn activations(&self) -> Vec<u64> {
        self.shared.activations.lock().expect("lock").clone()
    }

    pub fn active_version(&self) -> Option<u64> {
        self.shared.model.lock().expect("lock").as_ref().map(|(v, _)| *v)
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

impl ModelHost for TestHost {
    fn activate(&self, _path: &Path, bundle: &Bundle) -> Result<(), String> {
        let net = Backbone::from_bundle(bundle).map_err(|e| e.to_string())?;
        *self.shared.model.lock().map_err(|e| e.to_string())? = Some((bundle.model_version, net));
        self.shared.activations.lock().map_err(|e| e.to_string())?.push(bundle.model_version);
        Ok(())
    }

    fn health(&self) -> Health {
        Health {
            frames_seen: self.shared.frames.load(Ordering::SeqCst),
            collapse_events: self.shared.collapses.load(Ordering::SeqCst),
        }
    }
}

/// A device on loopback: its update server, its frame loop and its folders.
pub struct TestAgent {
    pub name: String,
    pub address: String,
    pub state_dir: PathBuf,
    pub trust_dir: PathBuf,
    pub host: Arc<TestHost>,
    pub server: UpdateServer,
}

/// The configuration of a test device living under `root/name`, seeded with a good
/// bundle of `seed_version`.
pub fn agent_config(root: &Path, name: &str, seed_version: u64) -> UpdateConfig {
    let base = root.join(name);
    let trust_dir = base.join("trust");
    write_trust_store(&trust_dir);
    let seed = base.join("shipped.scb");
    if !seed.exists() {
        std::fs::write(&seed, good_file(seed_version)).expect("seed model");
    }
    let listen = "127.0.0.1:0".parse().expect("loopback address");
    let mut config = UpdateConfig::new(name, listen, base.join("state"), trust_dir);
    config.seed_model = Some(seed);
    config.probation = short_probation();
    config
}

pub fn start_agent(root: &Path, name: &str, seed_version: u64) -> TestAgent {
    start_agent_with(agent_config(root, name, seed_version), TestHost::new())
}

pub fn start_agent_with(config: UpdateConfig, host: Arc<TestHost>) -> TestAgent {
    let name = config.device_name.clone();
    let state_dir = config.state_dir.clone();
    let trust_dir = config.trust_dir.clone();
    let server =
        UpdateServer::spawn(config, Arc::clone(&host) as Arc<dyn ModelHost>).expect("agent starts");
    TestAgent { name, address: server.local_addr().to_string(), state_dir, trust_dir, host, server }
}

/// Loads the installed model of a state directory the way the agent would.
pub fn installed_model_loads(state_dir: &Path) -> Result<u64, String> {
    let bundle =
        Bundle::load(&state_dir.join("update").join("current.scb")).map_err(|e| e.to_string())?;
    Backbone::from_bundle(&bundle).map_err(|e| e.to_string())?;
    Ok(bundle.model_version)
}
