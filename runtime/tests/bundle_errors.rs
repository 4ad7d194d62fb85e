//! Bad bundles must give typed errors that say what is wrong, never a panic and never an
//! allocation sized by a number read from the file.

use ndarray::Array4;
use proptest::prelude::*;
use selfclass_runtime::backbone::Backbone;
use selfclass_runtime::bundle::{Bundle, Provenance, Signature, MAX_BODY_BYTES};
use selfclass_runtime::testing::{self, tiny_anchors, tiny_onnx};
use selfclass_runtime::Error;
use sha2::{Digest, Sha256};

fn tiny_bundle() -> Bundle {
    testing::tiny_bundle("MatMul", 2)
}

/// Recomputes the digest after a change, so the parser behind the digest check is reached.
fn reseal(bytes: &mut [u8]) {
    let body_len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let end = 20usize.saturating_add(usize::try_from(body_len).unwrap_or(usize::MAX));
    if end.saturating_add(32) <= bytes.len() {
        let digest = Sha256::digest(&bytes[..end]);
        bytes[end..end + 32].copy_from_slice(&digest);
    }
}

fn bundle_error(bytes: &[u8]) -> String {
    match Bundle::from_bytes(bytes, "test.scb") {
        Err(e @ Error::Bundle { .. }) => e.to_string(),
        Err(other) => panic!("expected a bundle error, got {other}"),
        Ok(_) => panic!("a bad bundle was accepted"),
    }
}

#[test]
fn round_trip_keeps_everything() {
    let bundle = tiny_bundle();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.scb");
    bundle.save(&path).expect("save");
    let loaded = Bundle::load(&path).expect("load");
    assert_eq!(loaded, bundle);
    assert_eq!(loaded.classes_per_head(), vec![3]);
    let (a, b) = loaded.anchors().expect("anchors").expect("present");
    // Anchors are stored as f16: they come back to f16 precision.
    assert!(a[[1, 7]] != 0.0);
    let expected = [(a, tiny_anchors(2, 1.0)), (b, tiny_anchors(2, -1.0))];
    for (got, want) in expected {
        assert!((&got - &want).iter().all(|d| d.abs() < 1e-3), "{got} against {want}");
    }

    // The f16 network gives what the f32 network gives, to f16 precision.
    let f32_net = Backbone::from_onnx_bytes(&tiny_onnx("MatMul"), "tiny").expect("f32");
    let f16_net = Backbone::from_bundle(&loaded).expect("f16");
    let x = Array4::from_shape_fn((3, 1, 4, 4), |(n, _, y, x)| (n + y * 4 + x) as f32 / 10.0);
    let diff = &f32_net.embed(x.view()).expect("f32") - &f16_net.embed(x.view()).expect("f16");
    assert!(diff.iter().all(|d| d.abs() < 1e-2), "{diff:?}");
}

#[test]
fn signature_survives_and_stays_outside_the_digest() {
    let mut bundle = tiny_bundle();
    let unsigned_digest = bundle.digest().expect("digest");
    bundle.signature = Some(Signature { public_key: [7; 32], signature: [9; 64] });
    let bytes = bundle.to_bytes().expect("bytes");
    let loaded = Bundle::from_bytes(&bytes, "signed").expect("loads");
    assert_eq!(loaded.signature, bundle.signature);
    assert_eq!(loaded.digest().expect("digest"), unsigned_digest);
}

#[test]
fn every_truncation_is_refused() {
    let bytes = tiny_bundle().to_bytes().expect("bytes");
    for len in 0..bytes.len() {
        let msg = bundle_error(&bytes[..len]);
        assert!(
            msg.contains("truncated")
                || msg.contains("not a selfclass")
                || msg.contains("signature")
                || msg.contains("digest"),
            "length {len}: {msg}"
        );
    }
}

#[test]
fn wrong_magic_version_digest_and_lengths_say_so() {
    let good = tiny_bundle().to_bytes().expect("bytes");

    let mut b = good.clone();
    b[0] = b'X';
    assert!(bundle_error(&b).contains("not a selfclass model bundle"));

    let mut b = good.clone();
    b[8] = 9;
    assert!(bundle_error(&b).contains("format version 9"));

    let mut b = good.clone();
    let mid = b.len() / 2;
    b[mid] ^= 0x40;
    assert!(bundle_error(&b).contains("digest mismatch"));

    let mut b = good.clone();
    b[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(bundle_error(&b).contains("above the"));

    let mut b = good.clone();
    b[12..20].copy_from_slice(&(MAX_BODY_BYTES - 1).to_le_bytes());
    assert!(bundle_error(&b).contains("truncated"));

    let mut b = good.clone();
    let last = b.len() - 1;
    b[last] = 5;
    assert!(bundle_error(&b).contains("signature block"));

    let mut b = good;
    b.extend_from_slice(&[0; 10]);
    assert!(bundle_error(&b).contains("signature block"));
}

#[test]
fn a_huge_length_inside_the_body_is_refused_without_allocating() {
    let good = tiny_bundle().to_bytes().expect("bytes");
    // Overwrite the start of the body with varints of 2^56: decoders that trust lengths
    // would try to allocate them.
    for offset in 20..60 {
        let mut b = good.clone();
        let varint = [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01];
        let end = (offset + varint.len()).min(b.len());
        b[offset..end].copy_from_slice(&varint[..end - offset]);
        reseal(&mut b);
        let _ = Bundle::from_bytes(&b, "huge");
    }
}

#[test]
fn a_file_larger_than_any_bundle_is_refused_unread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("huge.scb");
    let file = std::fs::File::create(&path).expect("create");
    file.set_len(MAX_BODY_BYTES + 4096).expect("sparse file");
    let err = Bundle::load(&path).unwrap_err().to_string();
    assert!(err.contains("more than any bundle can be"), "{err}");
    let err = Bundle::load(&dir.path().join("missing.scb")).unwrap_err().to_string();
    assert!(err.contains("missing.scb"), "{err}");
}

#[test]
fn a_graph_that_does_not_load_is_an_inference_error() {
    assert!(matches!(
        Bundle::from_onnx(
            b"definitely not onnx",
            &tiny_bundle().heads().expect("heads"),
            tiny_bundle().preprocess,
            Provenance::default()
        ),
        Err(Error::Inference { .. })
    ));
    let bundle = Bundle::from_onnx(
        &tiny_onnx("NoSuchOperator"),
        &tiny_bundle().heads().expect("heads"),
        tiny_bundle().preprocess,
        Provenance::default(),
    )
    .expect("the container itself is fine");
    let bytes = bundle.to_bytes().expect("bytes");
    let loaded = Bundle::from_bytes(&bytes, "bad-graph.scb").expect("container loads");
    match Backbone::from_bundle(&loaded) {
        Err(e @ Error::Inference { .. }) => {
            assert!(e.to_string().contains("NoSuchOperator"), "{e}")
        }
        Err(other) => panic!("wrong error kind: {other}"),
        Ok(_) => panic!("an unknown operator loaded"),
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(i, m)| Mutation::Flip(i, m)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        if bytes.is_empty() {
            return;
        }
        match *m {
            Mutation::Flip(i, mask) => {
                let i = i % bytes.len();
                bytes[i] ^= mask;
            }
            Mutation::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
            Mutation::Delete(i) => {
                bytes.remove(i % bytes.len());
            }
            Mutation::Truncate(i) => bytes.truncate(i % bytes.len()),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any mutation of a valid bundle is either refused with an error or, if it happens to
    /// leave a valid bundle, accepted; it never panics.
    #[test]
    fn mutated_bundles_never_panic(mutations in prop::collection::vec(mutation(), 1..6)) {
        let mut bytes = tiny_bundle().to_bytes().expect("bytes");
        apply(&mut bytes, &mutations);
        let _ = Bundle::from_bytes(&bytes, "mutated");
    }

    /// The same with the digest recomputed, so the body decoder and validation see the
    /// damage; a body that still decodes must still load into the inference engine or be
    /// refused with an error.
    #[test]
    fn resealed_mutations_never_panic(mutations in prop::collection::vec(mutation(), 1..4)) {
        let mut bytes = tiny_bundle().to_bytes().expect("bytes");
        apply(&mut bytes, &mutations);
        if bytes.len() >= 20 {
            reseal(&mut bytes);
        }
        if let Ok(bundle) = Bundle::from_bytes(&bytes, "resealed") {
            let _ = bundle.heads();
            let _ = bundle.anchors();
            let _ = Backbone::from_bundle(&bundle);
        }
    }
}
