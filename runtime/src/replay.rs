//! The replay buffer that on-device adaptation learns from.
//!
//! Each kept frame is stored as a *pair*: the embeddings of two views of the same image
//! (the frame as captured and an augmented copy of it), in f16, which halves the memory
//! of a pair against f32 at a cost far below the loss's own noise (f16 keeps 11
//! significant bits; embeddings are unit vectors).
//!
//! Two populations live side by side:
//!
//! - **stream pairs**, made on the device from what the camera sees, in a
//!   [`ringbuf::HeapRb`] of fixed capacity. Arrival order is kept until the ring is full;
//!   from then on *reservoir sampling* (Vitter's algorithm R) decides: the `k`-th frame
//!   offered is kept with probability `capacity / k`, in place of a uniformly chosen
//!   pair. At every moment the ring is a uniform sample of everything offered so far, so
//!   the first minutes of a deployment are not washed out by the last ones.
//! - **anchor pairs**, embeddings of the server's training images shipped in the bundle
//!   ([`crate::bundle::Bundle::anchors`]). They are never evicted: mixing them into every
//!   batch is what keeps adaptation from forgetting what the server taught.
//!
//! A stream pair may carry a *note*: a few opaque bytes the caller keeps with it and gets
//! back in the same order as the pairs ([`ReplayBuffer::stream_notes`]). The agent keeps a
//! small thumbnail of the frame there, so the clusters found in a device's replay can be
//! shown as pictures.
//!
//! [`ReplayBuffer::to_bytes`] gives a self-checking file form (a SHA-256 digest over the
//! whole file), so a state directory can tell a damaged file from a good one.
//!
//! ```
//! use ndarray::Array1;
//! use rand::{rngs::StdRng, SeedableRng};
//! use selfclass_runtime::replay::ReplayBuffer;
//!
//! let mut replay = ReplayBuffer::new(2, 4).unwrap();
//! let mut rng = StdRng::seed_from_u64(1);
//! for i in 0..10 {
//!     let a = Array1::from(vec![1.0f32, i as f32]);
//!     if let Some(slot) = replay.admit(&mut rng) {
//!         replay.put(slot, a.view(), a.view()).unwrap();
//!     }
//! }
//! assert_eq!((replay.len(), replay.seen()), (4, 10));
//! let bytes = replay.to_bytes();
//! let back = ReplayBuffer::from_bytes(&bytes, "memory").unwrap();
//! assert_eq!(back.len(), 4);
//! ```

use half::f16;
use ndarray::{Array2, ArrayView1, ArrayView2};
use rand::Rng;
use ringbuf::traits::{Consumer, Observer, Producer};
use ringbuf::HeapRb;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The eight bytes a replay file starts with.
pub const REPLAY_MAGIC: &[u8; 8] = b"SCREPLAY";
/// The replay file format this runtime writes. Version 1 (no notes) is still read.
pub const REPLAY_FORMAT_VERSION: u16 = 2;
/// The longest note a pair may carry, in bytes.
pub const MAX_NOTE_BYTES: usize = 1 << 16;
/// Buffers larger than this many pairs are refused (a guard against absurd headers).
pub const MAX_CAPACITY: usize = 1 << 20;
const HEADER_BYTES: usize = 8 + 2 + 2 + 4 + 4 + 4 + 8;
const DIGEST_BYTES: usize = 32;

/// Where an admitted frame goes: appended while the ring has room, or in place of a
/// stored pair once it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Append,
    Replace(usize),
}

/// The two views of one image, `2 x dim` f16 values (view 1 then view 2), and its note.
#[derive(Debug, Clone, PartialEq)]
struct Pair {
    views: Box<[f16]>,
    note: Option<Box<[u8]>>,
}

/// A fixed-capacity reservoir of embedding pairs from the stream, plus fixed anchor pairs.
pub struct ReplayBuffer {
    ring: HeapRb<Pair>,
    capacity: usize,
    dim: usize,
    /// Frames offered to [`ReplayBuffer::admit`] since the buffer was created, restored
    /// state included: the `k` of the reservoir's `capacity / k`.
    seen: u64,
    anchors: Vec<Pair>,
}

impl std::fmt::Debug for ReplayBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayBuffer")
            .field("capacity", &self.capacity)
            .field("dim", &self.dim)
            .field("len", &self.len())
            .field("seen", &self.seen)
            .field("anchors", &self.anchors.len())
            .finish()
    }
}

impl ReplayBuffer {
    /// An empty buffer for embeddings of `dim` values holding up to `capacity` pairs.
    pub fn new(dim: usize, capacity: usize) -> Result<Self> {
        if dim == 0 || capacity == 0 || capacity > MAX_CAPACITY {
            return Err(Error::invalid(
                "replay buffer",
                format!(
                    "dimension {dim} and capacity {capacity}; both must be positive and the capacity at most {MAX_CAPACITY}"
                ),
            ));
        }
        Ok(ReplayBuffer {
            ring: HeapRb::new(capacity),
            capacity,
            dim,
            seen: 0,
            anchors: Vec::new(),
        })
    }

    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Most stream pairs the buffer holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Stream pairs held now.
    pub fn len(&self) -> usize {
        self.ring.occupied_len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Frames offered so far (kept or not).
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Anchor pairs held.
    pub fn anchor_count(&self) -> usize {
        self.anchors.len()
    }

    /// Memory the stored embeddings take, in bytes (stream and anchors), notes not counted.
    pub fn payload_bytes(&self) -> usize {
        (self.capacity + self.anchors.len()) * 2 * self.dim * std::mem::size_of::<f16>()
    }

    /// Memory the notes of the stream pairs take now, in bytes.
    pub fn note_bytes(&self) -> usize {
        self.ring.iter().map(|p| p.note.as_ref().map_or(0, |n| n.len())).sum()
    }

    /// Replaces the anchor pairs (two views per row, `count x dim` each); they are kept
    /// apart from the stream and never evicted.
    pub fn set_anchors(&mut self, view1: ArrayView2<f32>, view2: ArrayView2<f32>) -> Result<()> {
        if view1.dim() != view2.dim() || view1.ncols() != self.dim {
            return Err(Error::invalid(
                "replay anchors",
                format!(
                    "views of shapes {:?} and {:?} for a buffer of dimension {}",
                    view1.dim(),
                    view2.dim(),
                    self.dim
                ),
            ));
        }
        self.anchors = view1
            .rows()
            .into_iter()
            .zip(view2.rows())
            .map(|(a, b)| pair_of(a, b))
            .collect::<Result<_>>()?;
        Ok(())
    }

    /// Counts one offered frame and decides, by reservoir sampling, whether to keep it and
    /// where. The caller computes the pair only for frames that are admitted (making the
    /// augmented view is the expensive part), then stores it with [`ReplayBuffer::put`].
    pub fn admit<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Option<Slot> {
        self.seen += 1;
        let len = self.len();
        if len < self.capacity {
            return Some(Slot::Append);
        }
        // Algorithm R: keep the k-th item with probability capacity / k, in a uniform slot.
        let draw = rng.gen_range(0..self.seen);
        (draw < self.capacity as u64).then_some(Slot::Replace(draw as usize))
    }

    /// Stores a pair at a slot from [`ReplayBuffer::admit`].
    pub fn put(
        &mut self,
        slot: Slot,
        view1: ArrayView1<f32>,
        view2: ArrayView1<f32>,
    ) -> Result<()> {
        self.put_with_note(slot, view1, view2, None)
    }

    /// Stores a pair with a note (at most [`MAX_NOTE_BYTES`]; an empty note is no note).
    pub fn put_with_note(
        &mut self,
        slot: Slot,
        view1: ArrayView1<f32>,
        view2: ArrayView1<f32>,
        note: Option<&[u8]>,
    ) -> Result<()> {
        if let Some(n) = note.filter(|n| n.len() > MAX_NOTE_BYTES) {
            return Err(Error::invalid(
                "replay buffer",
                format!("a note of {} bytes; at most {MAX_NOTE_BYTES} are kept", n.len()),
            ));
        }
        if view1.len() != self.dim || view2.len() != self.dim {
            return Err(Error::invalid(
                "replay buffer",
                format!(
                    "views of {} and {} values for a buffer of dimension {}",
                    view1.len(),
                    view2.len(),
                    self.dim
                ),
            ));
        }
        let mut pair = pair_of(view1, view2)?;
        pair.note = note.filter(|n| !n.is_empty()).map(Box::from);
        match slot {
            Slot::Append => {
                // A full ring (the slot went stale) falls back to overwriting the oldest.
                if let Err(pair) = self.ring.try_push(pair) {
                    self.ring.try_pop();
                    let _ = self.ring.try_push(pair);
                }
            }
            Slot::Replace(index) => {
                let (head, tail) = self.ring.as_mut_slices();
                let target = if index < head.len() {
                    head.get_mut(index)
                } else {
                    tail.get_mut(index - head.len())
                };
                match target {
                    Some(stored) => *stored = pair,
                    None => {
                        return Err(Error::invalid(
                            "replay buffer",
                            format!("slot {index} of a buffer holding {}", self.len()),
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// Offers a pair and stores it if the reservoir admits it; returns whether it did.
    pub fn offer<R: Rng + ?Sized>(
        &mut self,
        rng: &mut R,
        view1: ArrayView1<f32>,
        view2: ArrayView1<f32>,
    ) -> Result<bool> {
        match self.admit(rng) {
            Some(slot) => self.put(slot, view1, view2).map(|()| true),
            None => Ok(false),
        }
    }

    /// `count` stream pairs drawn uniformly without replacement (all of them, shuffled, if
    /// fewer are held), as two `count x dim` matrices.
    pub fn sample_stream<R: Rng + ?Sized>(
        &self,
        count: usize,
        rng: &mut R,
    ) -> (Array2<f32>, Array2<f32>) {
        let (head, tail) = self.ring.as_slices();
        let pick = |i: usize| if i < head.len() { &head[i] } else { &tail[i - head.len()] };
        let indices = rand::seq::index::sample(rng, self.len(), count.min(self.len()));
        gather(self.dim, indices.iter().map(pick))
    }

    /// `count` anchor pairs drawn uniformly without replacement (all, shuffled, if fewer).
    pub fn sample_anchors<R: Rng + ?Sized>(
        &self,
        count: usize,
        rng: &mut R,
    ) -> (Array2<f32>, Array2<f32>) {
        let n = self.anchors.len();
        let indices = rand::seq::index::sample(rng, n, count.min(n));
        gather(self.dim, indices.iter().map(|i| &self.anchors[i]))
    }

    /// Every stream pair, oldest slot first, as two `len x dim` matrices.
    pub fn stream_pairs(&self) -> (Array2<f32>, Array2<f32>) {
        gather(self.dim, self.ring.iter())
    }

    /// The note of every stream pair, in the order of [`ReplayBuffer::stream_pairs`].
    pub fn stream_notes(&self) -> Vec<Option<&[u8]>> {
        self.ring.iter().map(|p| p.note.as_deref()).collect()
    }

    /// Every anchor pair as two `count x dim` matrices.
    pub fn anchor_pairs(&self) -> (Array2<f32>, Array2<f32>) {
        gather(self.dim, self.anchors.iter())
    }

    /// A copy with another capacity (a restored buffer under a new setting): keeps the
    /// oldest slots up to the new capacity and the count of frames seen. Anchors are kept.
    pub fn resized(&self, capacity: usize) -> Result<ReplayBuffer> {
        let mut out = ReplayBuffer::new(self.dim, capacity)?;
        for pair in self.ring.iter().take(capacity) {
            let _ = out.ring.try_push(pair.clone());
        }
        out.seen = self.seen.max(out.len() as u64);
        out.anchors = self.anchors.clone();
        Ok(out)
    }

    /// The stream part in its file form: header, then per pair its f16 values, the length
    /// of its note (u32, 0 for none) and the note, then SHA-256 of all before it.
    /// Anchors are not written: they come from the bundle at every start.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = self.len();
        let size = HEADER_BYTES + len * (4 * self.dim + 4) + self.note_bytes() + DIGEST_BYTES;
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(REPLAY_MAGIC);
        out.extend_from_slice(&REPLAY_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(self.dim as u32).to_le_bytes());
        out.extend_from_slice(&(self.capacity as u32).to_le_bytes());
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&self.seen.to_le_bytes());
        for pair in self.ring.iter() {
            for v in pair.views.iter() {
                out.extend_from_slice(&v.to_bits().to_le_bytes());
            }
            let note = pair.note.as_deref().unwrap_or_default();
            out.extend_from_slice(&(note.len() as u32).to_le_bytes());
            out.extend_from_slice(note);
        }
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        out
    }

    /// Decodes [`ReplayBuffer::to_bytes`], checking the digest before anything else;
    /// `origin` names the bytes in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let fail =
            |reason: String| Err(Error::invalid("replay file", format!("{origin}: {reason}")));
        if bytes.len() < HEADER_BYTES + DIGEST_BYTES || &bytes[..8] != REPLAY_MAGIC {
            return fail("not a replay file (too short or no SCREPLAY magic)".into());
        }
        let (body, digest) = bytes.split_at(bytes.len() - DIGEST_BYTES);
        if Sha256::digest(body).as_slice() != digest {
            return fail("digest mismatch: the file is damaged".into());
        }
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let version = u16_at(8);
        if version != 1 && version != REPLAY_FORMAT_VERSION {
            return fail(format!(
                "format version {version}, this runtime reads 1 to {REPLAY_FORMAT_VERSION}"
            ));
        }
        let (dim, capacity, len) = (u32_at(12) as usize, u32_at(16) as usize, u32_at(20) as usize);
        let mut seen_bytes = [0u8; 8];
        seen_bytes.copy_from_slice(&bytes[24..32]);
        let seen = u64::from_le_bytes(seen_bytes);
        let mut buffer = match ReplayBuffer::new(dim, capacity) {
            Ok(b) => b,
            Err(e) => return fail(e.to_string()),
        };
        let mut payload = &body[HEADER_BYTES..];
        let pair_bytes = 2 * dim * 2;
        // Each pair needs at least its values (and a note length from version 2 on).
        let least = pair_bytes + if version == 1 { 0 } else { 4 };
        let size_error = |payload: usize| {
            format!(
                "header says {len} pairs of dimension {dim} (capacity {capacity}, {seen} seen) but the payload is {payload} bytes"
            )
        };
        if len > capacity || seen < len as u64 || payload.len() / least < len {
            return fail(size_error(payload.len()));
        }
        let total = payload.len();
        for _ in 0..len {
            if payload.len() < pair_bytes {
                return fail(size_error(total));
            }
            let (values, rest) = payload.split_at(pair_bytes);
            let views: Box<[f16]> = values
                .chunks_exact(2)
                .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                .collect();
            if views.iter().any(|v| !v.is_finite()) {
                return fail("holds a non-finite embedding value".into());
            }
            payload = rest;
            let mut note = None;
            if version >= 2 {
                if payload.len() < 4 {
                    return fail(size_error(total));
                }
                let n = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
                let n = n as usize;
                if n > MAX_NOTE_BYTES || payload.len() - 4 < n {
                    return fail(format!("a pair's note of {n} bytes runs past the payload"));
                }
                note = (n > 0).then(|| Box::from(&payload[4..4 + n]));
                payload = &payload[4 + n..];
            }
            let _ = buffer.ring.try_push(Pair { views, note });
        }
        if !payload.is_empty() {
            return fail(size_error(total));
        }
        buffer.seen = seen;
        Ok(buffer)
    }
}

fn pair_of(view1: ArrayView1<f32>, view2: ArrayView1<f32>) -> Result<Pair> {
    if view1.iter().chain(view2.iter()).any(|v| !v.is_finite()) {
        return Err(Error::invalid("replay buffer", "non-finite embedding value"));
    }
    let views = view1.iter().chain(view2.iter()).map(|&v| f16::from_f32(v)).collect();
    Ok(Pair { views, note: None })
}

fn gather<'a>(dim: usize, pairs: impl Iterator<Item = &'a Pair>) -> (Array2<f32>, Array2<f32>) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut rows = 0;
    for pair in pairs {
        let (v1, v2) = pair.views.split_at(dim);
        a.extend(v1.iter().map(|v| v.to_f32()));
        b.extend(v2.iter().map(|v| v.to_f32()));
        rows += 1;
    }
    let shape = (rows, dim);
    (
        Array2::from_shape_vec(shape, a).unwrap_or_else(|_| Array2::zeros(shape)),
        Array2::from_shape_vec(shape, b).unwrap_or_else(|_| Array2::zeros(shape)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array1};
    use rand::{rngs::StdRng, SeedableRng};

    fn unit(i: usize, dim: usize) -> Array1<f32> {
        Array1::from_shape_fn(dim, |d| if d == i % dim { 1.0 } else { 0.0 })
    }

    /// Offers items tagged by their arrival index (stored in the first coordinate) and
    /// returns the tags held at the end.
    fn kept_tags(capacity: usize, offered: usize, seed: u64) -> Vec<usize> {
        let mut replay = ReplayBuffer::new(2, capacity).expect("valid");
        let mut rng = StdRng::seed_from_u64(seed);
        for i in 0..offered {
            let v = array![i as f32, 0.0];
            replay.offer(&mut rng, v.view(), v.view()).expect("stores");
        }
        let (v1, _) = replay.stream_pairs();
        v1.column(0).iter().map(|&t| t as usize).collect()
    }

    #[test]
    fn fills_in_order_then_stays_full() {
        let tags = kept_tags(8, 8, 1);
        assert_eq!(tags, (0..8).collect::<Vec<_>>());
        assert_eq!(kept_tags(8, 500, 1).len(), 8);
    }

    #[test]
    fn reservoir_keeps_old_and_new_uniformly() {
        // 200 items into a reservoir of 20, over 400 seeds: each item is kept with
        // probability 20/200 = 0.1, so each of the four quarters of the stream holds 5 of
        // the 20 slots on average. Over 400 runs the quarter means have a standard error of
        // about sqrt(20 * 0.25 * 0.75 / 400) ~ 0.1; a tolerance of 0.6 is six of those.
        let (capacity, offered, runs) = (20usize, 200usize, 400u64);
        let mut per_quarter = [0usize; 4];
        for seed in 0..runs {
            for tag in kept_tags(capacity, offered, seed) {
                per_quarter[tag * 4 / offered] += 1;
            }
        }
        for (q, &count) in per_quarter.iter().enumerate() {
            let mean = count as f64 / runs as f64;
            assert!((mean - 5.0).abs() < 0.6, "quarter {q} holds {mean} on average");
        }
    }

    #[test]
    fn a_pure_fifo_would_fail_the_reservoir_test() {
        // The same statistic for the newest-wins policy a plain ring gives: all 20 slots in
        // the last quarter. Shows the test above can fail.
        let mut ring = HeapRb::<usize>::new(20);
        for i in 0..200 {
            let _ = ringbuf::traits::RingBuffer::push_overwrite(&mut ring, i);
        }
        assert!(ring.iter().all(|&t| t * 4 / 200 == 3));
    }

    #[test]
    fn stores_f16_pairs_and_samples_without_replacement() {
        let mut replay = ReplayBuffer::new(4, 16).expect("valid");
        let mut rng = StdRng::seed_from_u64(3);
        for i in 0..10 {
            let (a, b) = (unit(i, 4) * 0.3333, unit(i + 1, 4));
            replay.offer(&mut rng, a.view(), b.view()).expect("stores");
        }
        let (v1, v2) = replay.sample_stream(6, &mut rng);
        assert_eq!(v1.dim(), (6, 4));
        for (a, b) in v1.rows().into_iter().zip(v2.rows()) {
            // f16 keeps 11 significant bits: 0.3333 comes back within 2e-4.
            let hot = a.iter().position(|&x| x != 0.0).expect("one hot");
            assert!((a[hot] - 0.3333).abs() < 2e-4);
            assert_eq!(b[(hot + 1) % 4], 1.0, "views stay paired");
        }
        let tags: std::collections::HashSet<_> =
            v1.rows().into_iter().zip(v2.rows()).map(|(a, b)| format!("{a}{b}")).collect();
        assert!(tags.len() >= 4, "drawn without replacement from 4 distinct pairs");
        let (all, _) = replay.sample_stream(100, &mut rng);
        assert_eq!(all.nrows(), 10);
    }

    #[test]
    fn anchors_are_kept_apart_and_never_evicted() {
        let mut replay = ReplayBuffer::new(2, 4).expect("valid");
        let anchors = array![[1.0f32, 0.0], [0.0, 1.0], [0.6, 0.8]];
        replay.set_anchors(anchors.view(), anchors.view()).expect("anchors");
        let mut rng = StdRng::seed_from_u64(4);
        for _ in 0..100 {
            replay
                .offer(&mut rng, array![0.5f32, 0.5].view(), array![0.5f32, 0.5].view())
                .expect("ok");
        }
        assert_eq!((replay.len(), replay.anchor_count()), (4, 3));
        let (a1, _) = replay.sample_anchors(10, &mut rng);
        assert_eq!(a1.nrows(), 3);
        assert!(replay.set_anchors(anchors.view(), array![[1.0f32, 0.0]].view()).is_err());
    }

    #[test]
    fn file_form_round_trips_and_detects_damage() {
        let mut replay = ReplayBuffer::new(3, 5).expect("valid");
        let mut rng = StdRng::seed_from_u64(5);
        for i in 0..12 {
            replay.offer(&mut rng, unit(i, 3).view(), unit(i + 2, 3).view()).expect("ok");
        }
        let bytes = replay.to_bytes();
        let back = ReplayBuffer::from_bytes(&bytes, "test").expect("decodes");
        assert_eq!((back.len(), back.seen(), back.capacity(), back.dim()), (5, 12, 5, 3));
        assert_eq!(back.stream_pairs(), replay.stream_pairs());

        for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
            let err = ReplayBuffer::from_bytes(&bytes[..cut], "cut").unwrap_err();
            assert!(err.to_string().contains("cut"), "{err}");
        }
        let mut flipped = bytes.clone();
        flipped[HEADER_BYTES + 3] ^= 0x40;
        assert!(ReplayBuffer::from_bytes(&flipped, "x")
            .unwrap_err()
            .to_string()
            .contains("digest"));
    }

    /// Appends the digest a file ends with to `body`.
    fn sealed(mut body: Vec<u8>) -> Vec<u8> {
        let digest = Sha256::digest(&body);
        body.extend_from_slice(&digest);
        body
    }

    #[test]
    fn notes_follow_their_pairs_through_replacement_and_the_file() {
        let mut replay = ReplayBuffer::new(2, 4).expect("valid");
        let mut rng = StdRng::seed_from_u64(6);
        for i in 0..40u32 {
            let v = array![i as f32, 1.0];
            if let Some(slot) = replay.admit(&mut rng) {
                // Every third frame has no note; the note names the frame.
                let note = i.to_le_bytes();
                let note = (i % 3 != 0).then_some(&note[..]);
                replay.put_with_note(slot, v.view(), v.view(), note).expect("stores");
            }
        }
        let check = |r: &ReplayBuffer| {
            let (v1, _) = r.stream_pairs();
            let notes = r.stream_notes();
            assert_eq!(notes.len(), v1.nrows());
            for (tag, note) in v1.column(0).iter().zip(notes) {
                let i = *tag as u32;
                match note {
                    Some(n) => assert_eq!(n, &i.to_le_bytes()[..], "pair {i}"),
                    None => assert_eq!(i % 3, 0, "pair {i} lost its note"),
                }
            }
        };
        check(&replay);
        let back = ReplayBuffer::from_bytes(&replay.to_bytes(), "notes").expect("decodes");
        check(&back);
        check(&back.resized(3).expect("resized"));
        let too_long = vec![0u8; MAX_NOTE_BYTES + 1];
        let err = replay
            .put_with_note(
                Slot::Append,
                array![1.0f32, 0.0].view(),
                array![1.0f32, 0.0].view(),
                Some(&too_long),
            )
            .unwrap_err();
        assert!(err.to_string().contains("note"), "{err}");
    }

    #[test]
    fn reads_version_1_files_and_refuses_notes_that_lie_about_their_length() {
        // A version-1 file: the header, two pairs of dimension 1, no notes.
        let mut v1 = Vec::new();
        v1.extend_from_slice(REPLAY_MAGIC);
        v1.extend_from_slice(&1u16.to_le_bytes());
        v1.extend_from_slice(&0u16.to_le_bytes());
        for n in [1u32, 4, 2] {
            v1.extend_from_slice(&n.to_le_bytes());
        }
        v1.extend_from_slice(&7u64.to_le_bytes());
        for v in [0.5f32, -0.5, 1.0, 0.25] {
            v1.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
        }
        let back = ReplayBuffer::from_bytes(&sealed(v1), "v1").expect("version 1 is read");
        assert_eq!((back.len(), back.seen()), (2, 7));
        assert_eq!(back.stream_pairs().1, array![[-0.5f32], [0.25]]);
        assert_eq!(back.stream_notes(), vec![None, None]);

        // A version-2 file whose first note claims more bytes than follow, resealed so
        // that only the length check can catch it.
        let mut replay = ReplayBuffer::new(1, 4).expect("valid");
        for i in 0..2 {
            let v = array![i as f32];
            replay.put_with_note(Slot::Append, v.view(), v.view(), Some(b"abc")).expect("ok");
        }
        let bytes = replay.to_bytes();
        let mut body = bytes[..bytes.len() - DIGEST_BYTES].to_vec();
        let note_len_at = HEADER_BYTES + 4;
        for lie in [4u32, 1000, u32::MAX] {
            body[note_len_at..note_len_at + 4].copy_from_slice(&lie.to_le_bytes());
            let err = ReplayBuffer::from_bytes(&sealed(body.clone()), "lying").unwrap_err();
            assert!(err.to_string().contains("lying"), "{err}");
        }
        // Extra bytes after the last pair are refused too.
        let mut longer = bytes[..bytes.len() - DIGEST_BYTES].to_vec();
        longer.push(0);
        assert!(ReplayBuffer::from_bytes(&sealed(longer), "longer").is_err());
    }

    #[test]
    fn rejects_bad_shapes_and_values() {
        assert!(ReplayBuffer::new(0, 4).is_err());
        assert!(ReplayBuffer::new(4, 0).is_err());
        let mut replay = ReplayBuffer::new(2, 4).expect("valid");
        assert!(replay
            .put(Slot::Append, array![1.0f32].view(), array![1.0f32, 0.0].view())
            .is_err());
        assert!(replay
            .put(Slot::Append, array![f32::NAN, 0.0].view(), array![1.0f32, 0.0].view())
            .is_err());
        assert!(replay
            .put(Slot::Replace(3), array![1.0f32, 0.0].view(), array![1.0f32, 0.0].view())
            .is_err());
    }
}
