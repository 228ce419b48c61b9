//! `mqtt-bench`: antumbra's MQTT broker against Mosquitto on loopback; prints figures, asserts nothing.
//!
//! `cargo run --release -p antumbra-e2e --bin mqtt-bench -- [--scenario all|conn-10k|p2p|fanin] [--devices N] [--quick]`
//! (see tests/BENCH.md).

#[path = "../bench/mod.rs"]
mod bench;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    bench::run(&bench::Args::parse())
}
