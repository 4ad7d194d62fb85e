//! selfclass firmware host: the `edge-agent` program and the parts it is made of.
//!
//! The binary (`src/bin/edge-agent.rs`) only parses arguments and reports errors; the work
//! is here, where it can be tested without a process:
//!
//! - [`source`]: frame sources (the compiled-in demo sample, image folders, IDX files, Y4M
//!   streams) and [`y4m`], the Y4M reader; [`camera`]: cameras behind the `camera` feature;
//! - [`slot`]: the newest-frame-wins mailbox between capture and inference;
//! - [`pipeline`]: the per-frame path (preprocess, embed, classify) and the adaptation
//!   worker (replay buffer plus adapter) that the agent and the benchmarks share;
//! - [`augment`]: the second view of a kept frame, and the benchmark's camera-like shift;
//! - [`agent`]: the three threads and their hand-offs; [`state`]: the state directory;
//!   [`thumb`]: the thumbnails the replay keeps of its frames;
//! - [`discover_cmd`]: offline cluster discovery with contact sheets and a browsable page;
//! - [`fixture`]: a bundle built from the reference network, for tests and early benchmarks.
//!
//! See `ARCHITECTURE.md` beside this crate for the design choices.

pub mod agent;
pub mod augment;
pub mod camera;
pub mod discover_cmd;
pub mod fixture;
pub mod pipeline;
pub mod slot;
pub mod source;
pub mod state;
pub mod thumb;
pub mod update;
pub mod y4m;
