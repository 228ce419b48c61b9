//! Presence is written behind, many devices per statement: what a wave of connects and disconnects leaves in
//! the database is what a restarted process reads back.

use std::time::Duration;

use antumbra::events::{DisconnectReason, EventBus};
use antumbra::presence::Presence;
use antumbra::registry::Registry;
use antumbra_wire::DeviceId;
use sqlx::Row;

use crate::helpers::{fresh_database, Backend};
use crate::on_both_backends;

on_both_backends!(a_wave_of_statuses_is_stored_and_read_back_after_a_restart,);

async fn stored_rows(pool: &sqlx::AnyPool, query: &str) -> i64 {
    sqlx::query(query)
        .fetch_one(pool)
        .await
        .unwrap()
        .try_get::<i64, _>(0)
        .unwrap()
}

async fn a_wave_of_statuses_is_stored_and_read_back_after_a_restart(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(backend, dir.path()).await;
    let pool = antumbra::db::connect(&url).await.unwrap();
    let registry = Registry::new(pool.clone());
    let presence = Presence::load(&registry, EventBus::new(), None).await.unwrap();
    // More devices than one statement takes, so several statements go in one batch.
    let devices: Vec<DeviceId> = (0..700)
        .map(|i| DeviceId::parse(format!("tag-{i:04}")).unwrap())
        .collect();
    let mut sessions = Vec::new();
    for device in &devices {
        sessions.push(presence.connected(device, "127.0.0.1:5000".into()).await.0);
    }
    for (device, session) in devices.iter().zip(&sessions).step_by(2) {
        presence.disconnected(device, *session, DisconnectReason::KeepAliveTimeout);
    }
    let all_written = "SELECT COUNT(*) FROM device_presence WHERE session > 0";
    let offline = "SELECT COUNT(*) FROM device_presence WHERE online = 0";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stored_rows(&pool, all_written).await < 700 || stored_rows(&pool, offline).await < 350 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "statuses not stored in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stored_rows(&pool, offline).await, 350);

    // A restart reads them back: the devices still online were cut off by the stop.
    drop(presence);
    let presence = Presence::load(&registry, EventBus::new(), None).await.unwrap();
    for (i, (device, session)) in devices.iter().zip(&sessions).enumerate() {
        let status = presence.status(device);
        assert!(!status.online, "{device}");
        assert_eq!(status.session, *session, "{device}");
        assert_eq!(status.remote_addr.as_deref(), Some("127.0.0.1:5000"));
        let reason = if i % 2 == 0 {
            DisconnectReason::KeepAliveTimeout
        } else {
            DisconnectReason::ServerShutdown
        };
        assert_eq!(status.last_disconnect_reason, Some(reason), "{device}");
    }
    // New sessions are numbered above every stored one.
    let (next, _) = presence.connected(&devices[0], "127.0.0.1:5001".into()).await;
    assert!(next > *sessions.iter().max().unwrap());
}
