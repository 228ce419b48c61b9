//! Building and running the application: [`Application::build`] → [`Application::http_addr`] →
//! [`Application::run_until_stopped`].

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix_web::{web, App, HttpServer};
use anyhow::Context;

use crate::access::{self, AdminBootstrap};
use crate::config::Settings;
use crate::events::EventBus;
use crate::http::{self, AppState};
use crate::liveness::Liveness;
use crate::mqtt::{self, FrontDoor, Metrics};
use crate::pki::known::KnownCertificates;
use crate::pki::{CaSource, CertificateAuthority};
use crate::presence::{ClusterView, Presence};
use crate::provisioning::Provisioning;
use crate::registry::Registry;
use crate::shadow::store::{EmbeddedStore, RedisStore, Store};
use crate::shadow::Shadows;

/// A built application: listeners bound, database migrated, CA loaded, MQTT router running. Nothing is served
/// until [`Application::run_until_stopped`].
pub struct Application {
    settings: Settings,
    http_listener: TcpListener,
    mqtts_listener: TcpListener,
    plain_listener: Option<TcpListener>,
    tls: tokio_rustls::TlsAcceptor,
    door: Arc<FrontDoor>,
    state: AppState,
    admin: AdminBootstrap,
    /// In a cluster: this instance's heartbeat, stopped on a clean stop.
    liveness: Option<Liveness>,
}

fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("binding the {what} listener on {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

impl Application {
    /// Opens the data directory, database and CA, applies migrations, ensures an admin key, starts the MQTT
    /// router and binds every listener (port 0 picks a free one).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating data dir {}", settings.data_dir.display()))?;
        let pool = crate::db::connect(&settings.database_url)
            .await
            .context("opening the registry database")?;
        let registry = Registry::new(pool);

        let sqlite = crate::db::Engine::of(&settings.database_url) == Some(crate::db::Engine::Sqlite);

        // Instances sharing a database share its CA, unless the operator gives CA files (see pki::shared).
        let pki_dir = settings.data_dir.join("pki");
        let source = CaSource {
            dir: pki_dir.clone(),
            provided: settings.ca.clone(),
            keep_files: sqlite,
        };
        let validity = time::Duration::days(i64::from(settings.cert_validity_days));
        let (ca, provenance) = CertificateAuthority::load_shared(&source, &registry, validity)
            .await
            .context("loading the CA")?;
        tracing::info!(from = %provenance, "device CA loaded");
        let ca = Arc::new(ca);
        let server = ca
            .write_server_identity(&pki_dir, &settings.mqtt_dns_names)
            .context("issuing the MQTT server certificate")?;
        // Only this process revokes: one instance (no Redis) on its own SQLite file.
        let revokes_alone = settings.redis_url.is_none() && sqlite;
        let known = Arc::new(KnownCertificates::from_active(
            registry
                .active_certificates(ca.fingerprint_sha256(), time::OffsetDateTime::now_utc())
                .await
                .context("loading the active device certificates")?,
            revokes_alone,
        ));
        tracing::debug!(certificates = known.len(), "active device certificates loaded");
        let tls = mqtt::tls::server_config(ca.ca_pem(), &server.chain_pem, &server.key_pem, known.clone())?;

        let admin = access::bootstrap_admin(&registry, settings.admin_token.as_deref())
            .await
            .context("ensuring the admin API key")?;
        let http_listener = bind(settings.http_addr, "REST")?;
        let mqtts_listener = bind(settings.mqtts_addr, "MQTT/TLS")?;
        let plain_listener = settings
            .mqtt_plain_addr
            .map(|a| bind(a, "plain MQTT (development)"))
            .transpose()?;

        let events = EventBus::new();
        // With Redis, this instance is one of a cluster: it keeps a heartbeat there (devices held by an instance
        // that stops beating go offline), session numbers come from one shared counter, and device messages and
        // session events travel through Redis to whichever instance needs them.
        let redis = match &settings.redis_url {
            Some(url) => {
                let client = redis::Client::open(url.as_str()).context("REDIS_URL")?;
                let conn = redis::aio::ConnectionManager::new(client)
                    .await
                    .context("connecting to Redis (REDIS_URL)")?;
                let liveness = Liveness::join(conn.clone(), &settings.redis_prefix)
                    .await
                    .context("joining the cluster's heartbeats in Redis")?;
                Some((url, conn, liveness))
            }
            None => None,
        };
        let view = match &redis {
            Some((_, _, liveness)) => Some(ClusterView {
                instance: liveness.instance.clone(),
                alive: liveness
                    .alive()
                    .await
                    .context("reading the cluster's heartbeats in Redis")?,
            }),
            None => None,
        };
        let mut presence = Presence::load(&registry, events.clone(), view)
            .await
            .context("loading presence")?;
        let store = match &settings.redis_url {
            Some(url) => Store::Redis(
                RedisStore::connect(url, &settings.redis_prefix)
                    .await
                    .context("connecting to Redis (REDIS_URL)")?,
            ),
            None => Store::Embedded(
                EmbeddedStore::open(&settings.data_dir.join("shadows.db"))
                    .await
                    .context("opening the shadow store")?,
            ),
        };
        let cluster = match redis {
            Some((url, conn, liveness)) => {
                presence = presence
                    .share_counter(conn, format!("{}session-seq", settings.redis_prefix))
                    .await;
                let (to, to_cluster) = tokio::sync::mpsc::unbounded_channel();
                let from = crate::cluster::bridge(
                    url,
                    &settings.redis_prefix,
                    liveness.instance.clone(),
                    to_cluster,
                    events.clone(),
                    presence.clone(),
                    registry.clone(),
                )
                .await
                .context("joining the cluster over Redis")?;
                liveness.clone().spawn(presence.clone(), registry.clone());
                Some((crate::mqtt::ClusterLink { to, from }, liveness))
            }
            None => None,
        };
        let (cluster, liveness) = cluster.unzip();
        let (shadows, outbox) = Shadows::new(store, settings.shadow_limits, registry.clone(), events.clone());
        let shadows = shadows.with_presence(presence.clone());
        let ota = crate::ota::Ota::new(registry.clone(), shadows.clone(), events.clone());
        ota.clone().spawn(std::time::Duration::from_millis(250));
        let mqtt_metrics = Arc::new(Metrics::default());
        let door = FrontDoor::start(
            settings.mqtt.clone(),
            registry.clone(),
            presence.clone(),
            events.clone(),
            mqtt_metrics.clone(),
            shadows.clone(),
            ota.clone(),
            outbox,
            cluster,
            known.clone(),
        )
        .await?;
        let state = AppState {
            provisioning: Provisioning::new(registry.clone(), ca, events.clone(), known),
            registry,
            presence,
            events,
            mqtt_metrics,
            shadows,
            ota,
        };
        Ok(Self {
            settings,
            http_listener,
            mqtts_listener,
            plain_listener,
            tls: tokio_rustls::TlsAcceptor::from(tls),
            door,
            state,
            admin,
            liveness,
        })
    }

    /// The address the REST API listens on.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The address the MQTT/TLS listener listens on.
    pub fn mqtts_addr(&self) -> SocketAddr {
        self.mqtts_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The development plain-MQTT address, when enabled.
    pub fn plain_addr(&self) -> Option<SocketAddr> {
        self.plain_listener
            .as_ref()
            .map(|l| l.local_addr().expect("a bound listener has an address"))
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
        let (http, mqtts) = (self.http_addr(), self.mqtts_addr());
        tracing::info!(%http, %mqtts, plain = ?self.plain_addr(), data_dir = %self.settings.data_dir.display(), "antumbra is up");
        println!("Antumbra is running.");
        println!("  REST API : http://{http}/v1");
        println!("  API docs : http://{http}/docs   (OpenAPI: http://{http}/openapi.json)");
        println!("  MQTT     : mqtts://{mqtts} (mutual TLS: device certificate, client id = device id)");
        if let Some(plain) = self.plain_addr() {
            println!("  MQTT dev : mqtt://{plain} (plain TCP, development only)");
        }
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
                    Err(e) => println!(
                        "  Admin API key (generated now, shown once; could not write {}: {e}):\n    {token}",
                        path.display()
                    ),
                }
            }
            AdminBootstrap::FromEnvironment => println!("  Admin API key: from ANTUMBRA_ADMIN_TOKEN"),
            AdminBootstrap::Existing => println!("  Admin API key: as generated on first start (see README)"),
        }
    }

    /// Serves until `shutdown` resolves; then stops accepting, closes MQTT sessions (`server_shutdown`) and lets
    /// in-flight requests finish (up to the configured timeout).
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.announce();
        let state = self.state.clone();
        let max_body = self.settings.max_body_bytes;
        let server = HttpServer::new(move || {
            App::new()
                .wrap(actix_web::middleware::Logger::new("%a \"%r\" %s %b %Dms").log_target("antumbra::http"))
                .configure(|cfg| http::configure(cfg, state.clone(), max_body))
                .default_service(web::to(http::not_found))
        })
        .disable_signals()
        .shutdown_timeout(self.settings.shutdown_timeout_secs)
        .listen(self.http_listener)?
        .run();
        let handle = server.handle();
        let server = tokio::spawn(server);

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let mqtts = tokio::net::TcpListener::from_std(self.mqtts_listener)?;
        let mut listeners = vec![tokio::spawn(mqtt::serve_tls(
            self.door.clone(),
            mqtts,
            self.tls,
            stopped(stop_rx.clone()),
        ))];
        if let Some(plain) = self.plain_listener {
            let plain = tokio::net::TcpListener::from_std(plain)?;
            listeners.push(tokio::spawn(mqtt::serve_plain(
                self.door.clone(),
                plain,
                stopped(stop_rx.clone()),
            )));
        }

        shutdown.await;
        tracing::info!("shutdown requested; finishing in-flight requests and closing MQTT sessions");
        let _ = stop_tx.send(true);
        for listener in listeners {
            let _ = listener.await;
        }
        let (_, ()) = tokio::join!(handle.stop(true), self.door.shutdown());
        if let Some(liveness) = &self.liveness {
            liveness.leave().await;
        }
        server.await.context("REST server task")??;
        tracing::info!("stopped");
        Ok(())
    }
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
