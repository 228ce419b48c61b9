use antumbra::config::{Cli, Command, Settings};
use antumbra::startup::{shutdown_signal, Application};
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or_else(|| Command::Serve(Box::default())) {
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
