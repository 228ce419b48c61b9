//! Building and running the application: [`Application::build`] → [`Application::http_addr`] →
//! [`Application::run_until_stopped`].

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use anyhow::Context;

use crate::access::{self, AdminBootstrap};
use crate::config::Settings;
use crate::http::{self, AppState};
use crate::pki::{CaSource, CertificateAuthority};
use crate::provisioning::Provisioning;
use crate::registry::Registry;

/// A built application: listeners bound, database migrated, CA loaded. Nothing runs until
/// [`Application::run_until_stopped`].
pub struct Application {
    settings: Settings,
    http_listener: TcpListener,
    state: AppState,
    admin: AdminBootstrap,
}

impl Application {
    /// Opens the data directory, database and CA, applies migrations, ensures an admin key, binds the REST
    /// listener (port 0 picks a free one).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating data dir {}", settings.data_dir.display()))?;
        let pool = crate::db::connect(&settings.database_url)
            .await
            .context("opening the registry database")?;
        let registry = Registry::new(pool);

        let pki_dir = settings.data_dir.join("pki");
        let source = CaSource {
            dir: pki_dir.clone(),
            provided: settings.ca.clone(),
        };
        let validity = time::Duration::days(i64::from(settings.cert_validity_days));
        let ca = Arc::new(CertificateAuthority::load_or_create(&source, validity).context("loading the CA")?);
        ca.write_server_identity(&pki_dir, &settings.mqtt_dns_names)
            .context("issuing the MQTT server certificate")?;

        let admin = access::bootstrap_admin(&registry, settings.admin_token.as_deref()).await?;
        let http_listener = TcpListener::bind(settings.http_addr)
            .with_context(|| format!("binding the REST listener on {}", settings.http_addr))?;
        let state = AppState {
            provisioning: Provisioning::new(registry.clone(), ca),
            registry,
        };
        Ok(Self {
            settings,
            http_listener,
            state,
            admin,
        })
    }

    /// The address the REST API listens on.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The admin token generated on this start, if one was (shown once).
    pub fn generated_admin_token(&self) -> Option<&str> {
        match &self.admin {
            AdminBootstrap::Generated(token) => Some(token),
            _ => None,
        }
    }

    /// Logs where everything listens and, on first start, the generated admin token.
    fn announce(&self) {
        let http = self.http_addr();
        tracing::info!(%http, data_dir = %self.settings.data_dir.display(), "antumbra is up");
        println!("Antumbra is running.");
        println!("  REST API : http://{http}/v1");
        println!("  API docs : http://{http}/docs   (OpenAPI: http://{http}/openapi.json)");
        println!(
            "  MQTT     : mqtts://{} (mutual TLS; broker lands with the MQTT issue)",
            self.settings.mqtts_addr
        );
        println!("  CA cert  : http://{http}/v1/ca");
        println!("  Data dir : {}", self.settings.data_dir.display());
        match &self.admin {
            AdminBootstrap::Generated(token) => {
                let path = self.settings.data_dir.join("admin-token");
                match access::write_token_file(&path, token) {
                    Ok(()) => println!(
                        "  Admin API key (generated now, shown once; also in {} — delete that file once saved):\n    {token}",
                        path.display()
                    ),
                    Err(e) => println!("  Admin API key (generated now, shown once; could not write {}: {e}):\n    {token}", path.display()),
                }
            }
            AdminBootstrap::FromEnvironment => println!("  Admin API key: from ANTUMBRA_ADMIN_TOKEN"),
            AdminBootstrap::Existing => println!("  Admin API key: as generated on first start (see README)"),
        }
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests finish (up to the
    /// configured timeout).
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.announce();
        let state = self.state.clone();
        let max_body = self.settings.max_body_bytes;
        let server = HttpServer::new(move || {
            App::new()
                .wrap(tracing_actix())
                .configure(|cfg| http::configure(cfg, state.clone(), max_body))
                .default_service(web::to(http::not_found))
        })
        .disable_signals()
        .shutdown_timeout(self.settings.shutdown_timeout_secs)
        .listen(self.http_listener)?
        .run();
        let handle = server.handle();
        let server = tokio::spawn(server);
        shutdown.await;
        tracing::info!("shutdown requested; finishing in-flight requests");
        handle.stop(true).await;
        server.await.context("REST server task")??;
        tracing::info!("REST server stopped");
        Ok(())
    }
}

fn tracing_actix() -> actix_web::middleware::Logger {
    actix_web::middleware::Logger::new("%a \"%r\" %s %b %Dms").log_target("antumbra::http")
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

/// Keeps `Duration` in scope for callers that build shutdown deadlines.
pub const DEFAULT_SHUTDOWN: Duration = Duration::from_secs(30);
