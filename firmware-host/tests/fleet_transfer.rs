//! Interrupted transfers resume from the last good chunk: after a connection cut in the
//! middle (through a loopback relay that drops it), and after the agent itself restarted.

mod fleet_support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use fleet_support::*;
use selfclass_firmware_host::update::client::{push, DeviceClient};
use selfclass_firmware_host::update::protocol::{Action, Chunk, Request, Response};

/// A relay on 127.0.0.1 in front of an agent. The first connection through it is cut once
/// `cut_after_bytes` bytes went from the client to the agent; later ones pass untouched.
struct CuttingRelay {
    address: String,
    connections: Arc<AtomicUsize>,
}

impl CuttingRelay {
    fn start(target: String, cut_after_bytes: usize) -> CuttingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay listens");
        let address = listener.local_addr().expect("address").to_string();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&connections);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let number = counter.fetch_add(1, Ordering::SeqCst);
                let Ok(agent) = TcpStream::connect(&target) else { return };
                let limit = if number == 0 { cut_after_bytes } else { usize::MAX };
                relay(client, agent, limit);
            }
        });
        CuttingRelay { address, connections }
    }
}

fn relay(client: TcpStream, agent: TcpStream, limit: usize) {
    let (mut client_read, mut agent_write) =
        (client.try_clone().expect("clone"), agent.try_clone().expect("clone"));
    let (mut agent_read, mut client_write) = (agent, client);
    std::thread::spawn(move || {
        let mut sent = 0usize;
        let mut buffer = [0u8; 512];
        loop {
            let n = match client_read.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let n = n.min(limit - sent);
            if agent_write.write_all(&buffer[..n]).is_err() {
                break;
            }
            sent += n;
            if sent >= limit {
                break;
            }
        }
        let _ = client_read.shutdown(Shutdown::Both);
        let _ = agent_write.shutdown(Shutdown::Both);
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut agent_read, &mut client_write);
        let _ = client_write.shutdown(Shutdown::Both);
    });
}

#[test]
fn a_transfer_cut_in_the_middle_resumes_and_completes() {
    let root = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(root.path(), "cam-cut", 1);
    // About 40 KiB in 1 KiB chunks; cut the connection around the middle of the file.
    let package = package(signed_file("MatMul", 1200, 2, &fleet_key()), 1024);
    let chunks = package.manifest.chunk_sha256.len() as u32;
    assert!(chunks >= 30, "{chunks} chunks");
    let relay = CuttingRelay::start(agent.address.clone(), package.bytes.len() / 2);

    let report = push("cam-cut", &relay.address, &fleet_key(), &package, &fast_push(), &|_| {});

    assert!(report.succeeded(), "{:?}", report.error);
    assert!(relay.connections.load(Ordering::SeqCst) >= 2, "the first connection was cut");
    let resumed = report.resumed_from_chunk.expect("the second connection resumed");
    assert!(resumed > chunks / 4 && resumed < chunks, "resumed at chunk {resumed} of {chunks}");
    assert_eq!((report.old_version, report.new_version), (Some(1), Some(2)));
    assert_eq!(installed_model_loads(&agent.state_dir), Ok(2));
}

#[test]
fn a_transfer_resumes_after_the_agent_restarted_and_checks_what_it_kept() {
    let root = tempfile::tempdir().expect("tempdir");
    let config = agent_config(root.path(), "cam-reboot", 1);
    let agent = start_agent_with(config.clone(), TestHost::new());
    let package = package(signed_file("MatMul", 600, 2, &fleet_key()), 1024);
    let chunks = package.manifest.chunk_sha256.len() as u32;

    // Send the first ten chunks by hand, then stop the agent.
    let mut client =
        DeviceClient::connect("cam-reboot", &agent.address, fast_push().timeouts).expect("connect");
    match client.order(&fleet_key(), Action::Offer(package.manifest.clone())).expect("offer") {
        Response::Accepted { next_chunk: 0, chunks: c } => assert_eq!(c, chunks),
        other => panic!("{other:?}"),
    }
    for index in 0..10 {
        let range = package.manifest.chunk_range(index);
        let data = package.bytes[range.start as usize..range.end as usize].to_vec();
        client
            .call(&Request::Chunk(Chunk { transfer: package.manifest.file_sha256, index, data }))
            .expect("chunk");
    }
    drop(client);
    drop(agent);

    // Damage the eighth chunk on disk, as a power cut before the data reached it might.
    let part = config.state_dir.join("update").join("incoming.part");
    let mut kept = std::fs::read(&part).expect("partial transfer kept");
    assert_eq!(kept.len(), 10 * 1024);
    kept[7 * 1024 + 5] ^= 0xff;
    std::fs::write(&part, &kept).expect("damage");

    let agent = start_agent_with(config, TestHost::new());
    let transfer = agent.server.status().transfer.expect("the transfer survived the restart");
    assert_eq!(transfer.chunks_stored, 7, "kept up to the last good chunk");

    let report = push("cam-reboot", &agent.address, &fleet_key(), &package, &fast_push(), &|_| {});
    assert!(report.succeeded(), "{:?}", report.error);
    assert_eq!(report.resumed_from_chunk, Some(7));
    assert_eq!(installed_model_loads(&agent.state_dir), Ok(2));
}
