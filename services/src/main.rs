use antumbra::config::{Cli, Command, Settings};
use antumbra::startup::{shutdown_signal, Application};
use clap::Parser;

/// See `antumbra::memory` for why mimalloc and how its memory goes back to the kernel.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    antumbra::memory::configure();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(antumbra::memory::on_worker_park)
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command() {
        Command::Openapi { out: Some(path) } => {
            Ok(std::fs::write(path, antumbra::http::openapi::document())?)
        }
        Command::Openapi { out: None } => {
            print!("{}", antumbra::http::openapi::document());
            Ok(())
        }
        Command::Serve(args) => {
            let settings = Settings::resolve(*args)?;
            antumbra::telemetry::init(settings.log_format);
            let app = Application::build(settings).await?;
            app.run_until_stopped(shutdown_signal()).await
        }
    }
}
