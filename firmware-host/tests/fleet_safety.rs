//! What a device refuses, and how it gets itself out of a bad model: each test drives a
//! real agent on loopback with real bundles.

mod fleet_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use fleet_support::*;
use selfclass_firmware_host::update::client::{push, DeviceClient, Package, PushReport};
use selfclass_firmware_host::update::protocol::{
    Action, DeviceState, Manifest, Order, Request, Response, PROTOCOL_VERSION,
};
use selfclass_firmware_host::update::{now_unix_ms, FleetKey};
use sha2::{Digest, Sha256};

fn push_bytes(agent: &TestAgent, bytes: Vec<u8>, key: &FleetKey) -> PushReport {
    push(&agent.name, &agent.address, key, &package(bytes, 1024), &fast_push(), &|_| {})
}

/// Sends a file the sending side cannot decode itself, announcing it as `version`.
fn push_damaged(agent: &TestAgent, bytes: Vec<u8>, version: u64) -> PushReport {
    let package = Package::from_parts(bytes, version, 1024, "damaged bundle").expect("package");
    push(&agent.name, &agent.address, &fleet_key(), &package, &fast_push(), &|_| {})
}

fn refusal(report: &PushReport) -> String {
    report
        .error
        .as_ref()
        .map(|e| e.to_string())
        .unwrap_or_else(|| panic!("the push succeeded: {report:?}"))
}

fn assert_untouched(agent: &TestAgent, version: u64) {
    let status = agent.server.status();
    assert_eq!(status.installed.map(|m| m.version), Some(version));
    assert_eq!(status.version_floor, version);
    assert_eq!(status.state, DeviceState::Running);
    assert_eq!(agent.host.active_version(), Some(version));
}

/// Recomputes the digest of a bundle file after its body was changed, as a forger would.
fn reseal(bytes: &mut [u8]) {
    let body_len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")) as usize;
    let digest = Sha256::digest(&bytes[..20 + body_len]);
    bytes[20 + body_len..52 + body_len].copy_from_slice(&digest);
}

#[test]
fn unsigned_wrongly_signed_tampered_and_older_bundles_are_refused_each_with_its_reason() {
    let root = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(root.path(), "cam-gate", 3);

    let unsigned = tiny_bundle("MatMul", 0);
    let mut unsigned_v4 = unsigned.clone();
    unsigned_v4.model_version = 4;
    let err = refusal(&push_bytes(&agent, unsigned_v4.to_bytes().expect("encode"), &fleet_key()));
    assert!(err.starts_with("cam-gate: model bundle v4 refused"), "{err}");
    assert!(err.contains("unsigned"), "{err}");

    let foreign = signed_file("MatMul", 0, 4, &stranger_key());
    let err = refusal(&push_bytes(&agent, foreign, &fleet_key()));
    assert!(err.contains("not in the trust store"), "{err}");

    // A signed bundle changed after signing, its digest recomputed to match the change.
    let mut forged = good_file(4);
    forged[40] ^= 0x01;
    reseal(&mut forged);
    let err = refusal(&push_bytes(&agent, forged, &fleet_key()));
    assert!(
        err.contains("does not match the bundle's content: it was changed after signing"),
        "{err}"
    );

    // A signed bundle damaged without fixing its digest.
    let mut damaged = good_file(4);
    damaged[40] ^= 0x01;
    let err = refusal(&push_damaged(&agent, damaged, 4));
    assert!(err.contains("not a valid bundle") && err.contains("digest mismatch"), "{err}");

    // Older, and equal but different from the installed file (an identical file is
    // reported as already current instead).
    for (older, bytes) in [(2, good_file(2)), (3, signed_file("MatMul", 10, 3, &fleet_key()))] {
        let err = refusal(&push_bytes(&agent, bytes, &fleet_key()));
        assert!(
            err.contains(&format!("version {older} is not above this device's version floor 3")),
            "{err}"
        );
    }

    assert_untouched(&agent, 3);
    // After all that, a good bundle still goes in.
    let report = push_bytes(&agent, good_file(4), &fleet_key());
    assert!(report.succeeded(), "{:?}", report.error);
    assert_eq!(agent.server.status().installed.map(|m| m.version), Some(4));
}

#[test]
fn orders_need_a_trusted_key_a_fresh_nonce_this_device_and_the_right_time() {
    let root = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(root.path(), "cam-auth", 1);
    assert!(push_bytes(&agent, good_file(2), &fleet_key()).succeeded());
    let mut client =
        DeviceClient::connect("cam-auth", &agent.address, fast_push().timeouts).expect("connect");

    // Status needs no key.
    assert_eq!(client.status().expect("status").installed.map(|m| m.version), Some(2));

    let challenge =
        |client: &mut DeviceClient| match client.call(&Request::Challenge).expect("challenge") {
            Response::Challenge { nonce, .. } => nonce,
            other => panic!("{other:?}"),
        };
    let rollback = |device: &str, nonce, issued_unix_ms| Order {
        device: device.into(),
        nonce,
        issued_unix_ms,
        action: Action::Rollback { reason: "test".into() },
    };
    let expect_refusal = |client: &mut DeviceClient, request: &Request, needle: &str| {
        let err = client.call(request).expect_err("refused").to_string();
        assert!(err.starts_with("cam-auth:") && err.contains(needle), "{err}");
    };

    let nonce = challenge(&mut client);
    let foreign =
        stranger_key().sign_order(&rollback("cam-auth", nonce, now_unix_ms())).expect("sign");
    expect_refusal(&mut client, &Request::Order(foreign), "not in the trust store");

    let other_device =
        fleet_key().sign_order(&rollback("cam-other", nonce, now_unix_ms())).expect("sign");
    expect_refusal(&mut client, &Request::Order(other_device), "it is for device cam-other");

    let made_up =
        fleet_key().sign_order(&rollback("cam-auth", [9; 32], now_unix_ms())).expect("sign");
    expect_refusal(&mut client, &Request::Order(made_up), "nonce was not issued here");

    let stale = fleet_key()
        .sign_order(&rollback("cam-auth", challenge(&mut client), now_unix_ms() - 3_600_000))
        .expect("sign");
    expect_refusal(&mut client, &Request::Order(stale), "away from this device's clock");

    let mut altered = fleet_key()
        .sign_order(&rollback("cam-auth", challenge(&mut client), now_unix_ms()))
        .expect("sign");
    altered.signature[0] ^= 1;
    expect_refusal(&mut client, &Request::Order(altered), "signature does not match the order");

    // A good order works once; the same bytes captured and sent again do not.
    let good = fleet_key()
        .sign_order(&rollback("cam-auth", challenge(&mut client), now_unix_ms()))
        .expect("sign");
    match client.call(&Request::Order(good.clone())).expect("rollback") {
        Response::RolledBack { from_version: 2, to_version: 1 } => {}
        other => panic!("{other:?}"),
    }
    expect_refusal(&mut client, &Request::Order(good), "used already (a replayed or stale order)");
    assert_eq!(agent.server.status().installed.map(|m| m.version), Some(1));
    assert_eq!(agent.server.status().version_floor, 2, "a rollback does not lower the floor");

    // With no previous model left, a second rollback is refused and says why.
    let err =
        client.rollback(&fleet_key(), "again").expect_err("nothing to go back to").to_string();
    assert!(err.contains("no previous model is kept"), "{err}");
}

#[test]
fn absurd_sizes_and_damaged_chunks_are_refused_before_they_cost_anything() {
    let root = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(root.path(), "cam-limits", 1);

    // A frame announcing 4 GiB: refused after its four length bytes.
    let mut raw = TcpStream::connect(&agent.address).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    raw.write_all(&u32::MAX.to_le_bytes()).expect("write length");
    let mut len = [0u8; 4];
    raw.read_exact(&mut len).expect("an answer comes without the frame being sent");
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    raw.read_exact(&mut body).expect("answer");
    assert_eq!(body[0], PROTOCOL_VERSION);
    let answer: Response = postcard::from_bytes(&body[1..]).expect("decode");
    assert!(
        matches!(&answer, Response::Error { message } if message.contains("refused unread")),
        "{answer:?}"
    );

    let mut client =
        DeviceClient::connect("cam-limits", &agent.address, fast_push().timeouts).expect("connect");
    let offer = |size_bytes: u64, chunks: usize| Manifest {
        model_version: 2,
        size_bytes,
        file_sha256: [1; 32],
        chunk_bytes: 1 << 20,
        chunk_sha256: vec![[0; 32]; chunks],
    };
    let err = client
        .order(&fleet_key(), Action::Offer(offer(40 << 30, 1)))
        .expect_err("too big")
        .to_string();
    assert!(
        err.contains("offer of model v2 (42949672960 bytes) refused")
            && err.contains("nothing was read"),
        "{err}"
    );
    let err = client
        .order(&fleet_key(), Action::Offer(offer(3 << 20, 2)))
        .expect_err("bad count")
        .to_string();
    assert!(err.contains("2 chunk digests for 3 chunks"), "{err}");

    // A real offer, then a chunk that does not match its digest.
    let package = package(signed_file("MatMul", 100, 2, &fleet_key()), 1024);
    client.order(&fleet_key(), Action::Offer(package.manifest.clone())).expect("offer");
    let mut chunk = selfclass_firmware_host::update::protocol::Chunk {
        transfer: package.manifest.file_sha256,
        index: 0,
        data: package.bytes[..1024].to_vec(),
    };
    chunk.data[3] ^= 0xff;
    let err = client.call(&Request::Chunk(chunk)).expect_err("damaged").to_string();
    assert!(err.contains("chunk 0 of transfer") && err.contains("damaged in transit"), "{err}");
    assert_untouched(&agent, 1);
}

#[test]
fn a_model_that_does_not_load_is_rolled_back_at_once() {
    let root = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(root.path(), "cam-load", 1);
    let broken = signed_file("NoSuchOperator", 0, 2, &fleet_key());

    let err = refusal(&push_bytes(&agent, broken, &fleet_key()));
    assert!(err.starts_with("cam-load: install of model bundle v2: v2 does not load"), "{err}");

    let status = agent.server.status();
    assert_eq!(status.installed.map(|m| m.version), Some(1));
    assert!(
        matches!(&status.state, DeviceState::RolledBack { from_version: 2, reason } if reason.contains("does not load")),
        "{status:?}"
    );
    assert_eq!(status.version_floor, 2, "the failed version cannot be pushed again");
    assert_eq!(agent.host.activations(), vec![1, 1]);
    assert_eq!(installed_model_loads(&agent.state_dir), Ok(1));
}

#[test]
fn a_model_whose_collapse_guard_fires_during_probation_is_rolled_back() {
    let root = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(root.path(), "cam-collapse", 1);
    agent.host.collapse_on(2);

    let err = refusal(&push_bytes(&agent, good_file(2), &fleet_key()));
    assert!(
        err.starts_with("cam-collapse: probation of v2: failed and the device went back to v1"),
        "{err}"
    );
    assert!(err.contains("the collapse guard fired 1 time(s)"), "{err}");
    assert_eq!(agent.host.active_version(), Some(1));
    assert_eq!(agent.host.activations(), vec![1, 2, 1]);

    // The next version, which behaves, goes through.
    let report = push_bytes(&agent, good_file(3), &fleet_key());
    assert!(report.succeeded(), "{:?}", report.error);
    assert_eq!(report.old_version, Some(1));
    assert_eq!(agent.server.status().state, DeviceState::Running);
}

#[test]
fn an_agent_stopped_during_probation_goes_back_to_the_previous_model_when_it_restarts() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut config = agent_config(root.path(), "cam-restart", 1);
    config.probation.window = Duration::from_secs(60);
    let agent = start_agent_with(config.clone(), TestHost::new());

    let mut client = DeviceClient::connect("cam-restart", &agent.address, fast_push().timeouts)
        .expect("connect");
    let package = package(good_file(2), 1024);
    client.order(&fleet_key(), Action::Offer(package.manifest.clone())).expect("offer");
    for index in 0..package.manifest.chunk_sha256.len() as u32 {
        let range = package.manifest.chunk_range(index);
        let chunk = selfclass_firmware_host::update::protocol::Chunk {
            transfer: package.manifest.file_sha256,
            index,
            data: package.bytes[range.start as usize..range.end as usize].to_vec(),
        };
        client.call(&Request::Chunk(chunk)).expect("chunk");
    }
    let installed =
        client.order(&fleet_key(), Action::Install { file_sha256: package.manifest.file_sha256 });
    assert!(matches!(installed, Ok(Response::Installed { version: 2, .. })), "{installed:?}");
    assert!(matches!(agent.server.status().state, DeviceState::Probation { version: 2, .. }));
    drop(client);
    drop(agent);

    let restarted = start_agent_with(config, TestHost::new());
    let status = restarted.server.status();
    assert_eq!(status.installed.map(|m| m.version), Some(1));
    assert!(
        matches!(&status.state, DeviceState::RolledBack { from_version: 2, reason } if reason.contains("stopped during the probation of v2")),
        "{status:?}"
    );
    assert_eq!(restarted.host.activations(), vec![1]);
}

/// Regression: pushing again the version a device had been ordered away from was reported
/// as a failed probation of that version. The device refuses it for its floor, and the
/// report must say so.
#[test]
fn pushing_again_a_version_that_was_rolled_back_is_refused_for_the_floor() {
    let root = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(root.path(), "cam-again", 1);
    assert!(push_bytes(&agent, good_file(2), &fleet_key()).succeeded());
    let mut client =
        DeviceClient::connect("cam-again", &agent.address, fast_push().timeouts).expect("connect");
    assert_eq!(client.rollback(&fleet_key(), "test").expect("rollback"), (2, 1));

    let err = refusal(&push_bytes(&agent, good_file(2), &fleet_key()));
    assert!(err.contains("version 2 is not above this device's version floor 2"), "{err}");
    assert_eq!(agent.server.status().installed.map(|m| m.version), Some(1));
}
