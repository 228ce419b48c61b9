//! `shadow-bench`: device shadow updates per second and latencies over MQTT and REST, on the embedded store and
//! on Redis, beside the raw broker rate of the same run; prints figures, asserts nothing.
//!
//! `cargo run --release -p antumbra-e2e --bin shadow-bench -- [--store both|embedded|redis] [--quick]`
//! (see tests/BENCH.md).

// The MQTT client, broker processes, CPU meters and reports of mqtt-bench; this tool uses only some of them.
#[path = "../bench/mod.rs"]
#[allow(dead_code)]
mod bench;
#[path = "../bench/shadow/mod.rs"]
mod shadow;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    shadow::run(&shadow::Args::parse())
}
