//! One conformance suite, run against the embedded store and against a real Redis (started by tests/run.sh;
//! `ANTUMBRA_TEST_REDIS_URL`). Each run uses a fresh file or a fresh key prefix.

use std::sync::Arc;

use serde_json::json;

use super::document::{Document, Patch};
use super::request::{parse_update, Limits, PlainRequest, ShadowError};
use super::store::{EmbeddedStore, RedisStore, ShadowKey, ShadowName, ShadowStore, Store};
use super::Shadows;
use crate::events::EventBus;
use crate::registry::Registry;
use antumbra_wire::DeviceId;

fn key(device: &str, name: Option<&str>) -> ShadowKey {
    ShadowKey {
        device: DeviceId::parse(device).unwrap(),
        name: name.map(|n| ShadowName::parse(n).unwrap()),
    }
}

fn doc(version: u64, reported: serde_json::Value) -> Arc<Document> {
    let mut d = Document::default().updated(
        &Patch::Absent,
        &Patch::Merge(reported.as_object().unwrap().clone()),
        10,
    );
    d.version = version;
    Arc::new(d)
}

async fn embedded(dir: &tempfile::TempDir) -> Store {
    Store::Embedded(EmbeddedStore::open(&dir.path().join("shadows.db")).await.unwrap())
}

fn redis_url() -> String {
    std::env::var("ANTUMBRA_TEST_REDIS_URL")
        .expect("ANTUMBRA_TEST_REDIS_URL is not set: run the suite with tests/run.sh, which starts a private redis-server")
}

/// A key prefix no other test uses.
fn fresh_prefix() -> String {
    format!("test{:016x}:", rand::random::<u64>())
}

/// A Redis store (its own connection and its own memory) under `prefix`.
async fn redis_at(prefix: &str) -> Store {
    Store::Redis(RedisStore::connect(&redis_url(), prefix).await.unwrap())
}

async fn redis() -> Store {
    redis_at(&fresh_prefix()).await
}

async fn service(store: Store, dir: &tempfile::TempDir) -> Shadows {
    Shadows::new(
        store,
        Limits::default(),
        service_registry(dir).await,
        EventBus::new(),
    )
    .0
}

/// A registry in `dir` for a service under test.
async fn service_registry(dir: &tempfile::TempDir) -> Registry {
    let pool = crate::db::connect(&crate::db::sqlite_url(&dir.path().join("registry.db")))
        .await
        .unwrap();
    Registry::new(pool)
}

/// Two instances on one Redis prefix and one registry, each with its own connection to Redis and so its own
/// memory of what it last read or wrote.
async fn two_redis_instances(dir: &tempfile::TempDir) -> (Shadows, Shadows) {
    let prefix = fresh_prefix();
    let a = service(redis_at(&prefix).await, dir).await;
    let b = Shadows::new(
        redis_at(&prefix).await,
        Limits::default(),
        a.registry.clone(),
        EventBus::new(),
    )
    .0;
    (a, b)
}

async fn compare_and_set_is_exact(store: Store) {
    let k = key("dev-1", None);
    assert_eq!(store.load(&k).await.unwrap().version, 0);
    assert!(store.load(&k).await.unwrap().document.is_none());
    assert!(store
        .compare_and_set(&k, 0, 1, Some(&doc(1, json!({"a": 1}))))
        .await
        .unwrap());
    assert!(
        !store
            .compare_and_set(&k, 0, 1, Some(&doc(1, json!({"a": 2}))))
            .await
            .unwrap(),
        "a second create loses"
    );
    assert!(
        !store
            .compare_and_set(&k, 5, 6, Some(&doc(6, json!({"a": 3}))))
            .await
            .unwrap(),
        "a stale version loses"
    );
    let stored = store.load(&k).await.unwrap();
    assert_eq!(stored.version, 1);
    assert_eq!(stored.document, Some(doc(1, json!({"a": 1}))));
    assert!(store
        .compare_and_set(&k, 1, 2, Some(&doc(2, json!({"a": 4}))))
        .await
        .unwrap());
    assert_eq!(
        store.load(&k).await.unwrap().document.unwrap().reported,
        Some(json!({"a": 4}).as_object().unwrap().clone())
    );
}

async fn versions_survive_delete_and_recreate(store: Store) {
    let k = key("dev-2", None);
    assert!(store
        .compare_and_set(&k, 0, 1, Some(&doc(1, json!({"a": 1}))))
        .await
        .unwrap());
    assert!(store
        .compare_and_set(&k, 1, 7, Some(&doc(7, json!({"a": 1}))))
        .await
        .unwrap());
    assert!(store.compare_and_set(&k, 7, 7, None).await.unwrap(), "delete");
    let stored = store.load(&k).await.unwrap();
    assert_eq!((stored.document, stored.version), (None, 7));
    assert!(
        !store
            .compare_and_set(&k, 0, 1, Some(&doc(1, json!({}))))
            .await
            .unwrap(),
        "no restart from zero"
    );
    assert!(store
        .compare_and_set(&k, 7, 8, Some(&doc(8, json!({}))))
        .await
        .unwrap());
}

async fn named_shadows_are_separate_and_purge_keeps_only_versions(store: Store) {
    let classic = key("dev-3", None);
    let named = key("dev-3", Some("config"));
    let other = key("dev-4", None);
    assert!(store
        .compare_and_set(&classic, 0, 1, Some(&doc(1, json!({"c": 1}))))
        .await
        .unwrap());
    assert!(store
        .compare_and_set(&named, 0, 1, Some(&doc(1, json!({"n": 1}))))
        .await
        .unwrap());
    assert!(store
        .compare_and_set(&other, 0, 1, Some(&doc(1, json!({"o": 1}))))
        .await
        .unwrap());
    assert_eq!(
        store.load(&named).await.unwrap().document.unwrap().reported,
        Some(json!({"n": 1}).as_object().unwrap().clone())
    );
    let second = key("dev-3", Some("calibration"));
    assert!(store
        .compare_and_set(&second, 0, 1, Some(&doc(1, json!({"k": 1}))))
        .await
        .unwrap());
    let mut names: Vec<String> = store
        .named(&classic.device)
        .await
        .unwrap()
        .iter()
        .map(|n| n.as_str().to_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["calibration", "config"], "named lists named shadows only");
    assert!(store.named(&other.device).await.unwrap().is_empty());
    store.purge(&classic.device).await.unwrap();
    for k in [&classic, &named] {
        let stored = store.load(k).await.unwrap();
        assert_eq!(
            (stored.document, stored.version),
            (None, 1),
            "documents go, versions stay"
        );
        assert!(
            !store
                .compare_and_set(k, 0, 1, Some(&doc(1, json!({}))))
                .await
                .unwrap(),
            "a device registered again does not restart from zero"
        );
    }
    assert!(store
        .compare_and_set(&named, 1, 2, Some(&doc(2, json!({"n": 2}))))
        .await
        .unwrap());
    assert_eq!(
        store.load(&other).await.unwrap().version,
        1,
        "other devices are untouched"
    );
    // Forgetting (what other instances do on the deletion event) writes nothing: a shadow written after the
    // purge, by a device registered again, keeps its document.
    store.forget(&classic.device);
    let stored = store.load(&named).await.unwrap();
    assert_eq!(stored.version, 2);
    assert!(stored.document.is_some(), "forget left the new document");
    // A second purge finds the shadow written after the first.
    store.purge(&classic.device).await.unwrap();
    let stored = store.load(&named).await.unwrap();
    assert_eq!((stored.document, stored.version), (None, 2));
    store.ping().await.unwrap();
}

async fn concurrent_updates_never_lose_one(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    // Two services over one store stand for two instances: their writes race in the store itself.
    let a = Arc::new(service(store.clone(), &dir).await);
    let b = Arc::new(Shadows::new(store, Limits::default(), a.registry.clone(), EventBus::new()).0);
    let shadows = a.clone();
    let k = key("busy", None);
    let mut tasks = Vec::new();
    for writer in 0..8 {
        let (shadows, k) = (if writer % 2 == 0 { a.clone() } else { b.clone() }, k.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let body = json!({"state": {"reported": {format!("w{writer}_{i}"): i}}});
                let request = parse_update(body.to_string().as_bytes(), &Limits::default()).unwrap();
                shadows.update(&k, &request, true).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let document = shadows.get(&k, true).await.unwrap();
    assert_eq!(document.version, 200, "every update got its own version");
    assert_eq!(document.reported.unwrap().len(), 200, "no update was lost");
}

/// A flood on one shadow: past `MAX_IN_FLIGHT` waiting requests the rest are refused with 429 at once, every
/// accepted one is applied, and once the queue has drained the shadow takes requests again.
async fn a_flood_on_one_shadow_is_refused_past_the_in_flight_limit(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let shadows = service(store, &dir).await;
    let k = key("flooded", None);
    let other = key("calm", None);
    let update = |field: String| {
        parse_update(
            json!({"state": {"reported": {field: 1}}}).to_string().as_bytes(),
            &Limits::default(),
        )
        .unwrap()
    };
    let requests: Vec<_> = (0..crate::shadow::MAX_IN_FLIGHT + 50)
        .map(|i| update(format!("f{i}")))
        .collect();
    // Polled together on one task: each request enters (and waits) before any has finished.
    let outcomes = futures_util::future::join_all(requests.iter().map(|r| shadows.update(&k, r, true))).await;
    let accepted = outcomes.iter().filter(|o| o.is_ok()).count();
    let refused: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(!refused.is_empty(), "the flood met the limit");
    assert!(refused.iter().all(|e| e.code() == 429), "{refused:?}");
    assert!(accepted >= crate::shadow::MAX_IN_FLIGHT, "{accepted} accepted");
    let document = shadows.get(&k, true).await.unwrap();
    assert_eq!(document.version, accepted as u64, "every accepted update applied");
    assert_eq!(document.reported.unwrap().len(), accepted);
    // Another shadow is not affected, and this one takes requests again.
    shadows.update(&other, &update("x".into()), true).await.unwrap();
    shadows.update(&k, &update("again".into()), true).await.unwrap();
}

async fn the_service_applies_aws_rules_end_to_end(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let shadows = service(store, &dir).await;
    let k = key("svc", None);
    let update = |v: serde_json::Value| parse_update(v.to_string().as_bytes(), &Limits::default()).unwrap();
    assert!(matches!(
        shadows.get(&k, true).await,
        Err(ShadowError::NotFound(_))
    ));
    let first = shadows
        .update(
            &k,
            &update(json!({"state": {"desired": {"t": 21}}, "clientToken": "c1"})),
            true,
        )
        .await
        .unwrap();
    let accepted: serde_json::Value = serde_json::from_slice(&first.accepted).unwrap();
    assert_eq!(accepted["version"], 1);
    assert_eq!(accepted["clientToken"], "c1");
    assert_eq!(
        accepted["metadata"]["desired"]["t"]["timestamp"],
        accepted["timestamp"]
    );
    let conflict = shadows
        .update(
            &k,
            &update(json!({"state": {"reported": {"t": 21}}, "version": 0})),
            true,
        )
        .await;
    assert_eq!(conflict.unwrap_err(), ShadowError::VersionConflict { current: 1 });
    let second = shadows
        .update(
            &k,
            &update(json!({"state": {"reported": {"t": 21}}, "version": 1})),
            true,
        )
        .await
        .unwrap();
    assert_eq!(second.document.version, 2);
    assert!(second.document.delta_message().is_none());
    let deleted = shadows.delete(&k, &PlainRequest::default(), true).await.unwrap();
    assert_eq!(deleted["version"], 2);
    assert!(matches!(
        shadows.get(&k, true).await,
        Err(ShadowError::NotFound(_))
    ));
    let again = shadows
        .update(&k, &update(json!({"state": {"desired": {"t": 5}}})), true)
        .await
        .unwrap();
    assert_eq!(again.document.version, 3, "versions never go back after delete");
    let big = json!({"state": {"desired": {"blob": "x".repeat(70 * 1024)}}});
    assert_eq!(
        parse_update(big.to_string().as_bytes(), &Limits::default())
            .unwrap_err()
            .code(),
        413
    );
    // Growth past the limit through many small updates is refused too.
    let limits = Limits {
        max_state_bytes: 200,
        ..Limits::default()
    };
    let small = Shadows::new(
        shadows.store.clone(),
        limits,
        shadows.registry.clone(),
        EventBus::new(),
    )
    .0;
    let k2 = key("grow", None);
    let small_update = |body: serde_json::Value| parse_update(body.to_string().as_bytes(), &limits).unwrap();
    let mut last = None;
    for i in 0..20 {
        let body = json!({"state": {"reported": {format!("field{i}"): "0123456789"}}});
        match small.update(&k2, &small_update(body), true).await {
            Ok(updated) => last = Some(updated.document),
            Err(e) => {
                assert_eq!(e.code(), 413);
                break;
            }
        }
    }
    let last = last.expect("the first updates fit");
    assert!(last.version < 20, "an update was refused");
    // The refused update changed the document it was given (the stores hand it over to be changed in place):
    // what is read now, and what the next update starts from, is still the last accepted version.
    assert_eq!(
        small.get(&k2, true).await.unwrap(),
        *last,
        "the refused update wrote nothing"
    );
    let shrunk = small
        .update(
            &k2,
            &small_update(json!({"state": {"reported": {"field0": null}}})),
            true,
        )
        .await
        .unwrap();
    let mut expected = (*last).clone();
    expected.reported.as_mut().unwrap().remove("field0");
    expected.reported_meta.remove("field0");
    assert_eq!(shrunk.document.version, last.version + 1);
    assert_eq!(shrunk.document.reported, expected.reported);
    assert_eq!(shrunk.document.reported_meta, expected.reported_meta);
    // A version conflict found on the memory's copy leaves it as it was too.
    let conflict = small
        .update(
            &k2,
            &small_update(json!({"state": {"reported": {"field1": 1}}, "version": 1})),
            true,
        )
        .await;
    assert_eq!(conflict.unwrap_err().code(), 409);
    assert_eq!(small.get(&k2, true).await.unwrap(), *shrunk.document);
}

/// Two instances, each with its own connection to Redis (and so its own memory of what it last wrote), update
/// one shadow in turns: each update starts from what its instance last saw, which is stale every time, and the
/// version-checked write must catch it.
#[tokio::test]
async fn redis_instances_with_stale_memories_never_lose_an_update() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_redis_instances(&dir).await;
    let k = key("shared", None);
    for i in 0..40 {
        let body = json!({"state": {"reported": {format!("f{i}"): i}}});
        let request = parse_update(body.to_string().as_bytes(), &Limits::default()).unwrap();
        let shadows = if i % 2 == 0 { &a } else { &b };
        let updated = shadows.update(&k, &request, true).await.unwrap();
        assert_eq!(updated.document.version, i + 1);
    }
    for shadows in [&a, &b] {
        let document = shadows.get(&k, true).await.unwrap();
        assert_eq!(document.version, 40);
        assert_eq!(document.reported.unwrap().len(), 40, "no update was lost");
    }
    // A conditional update naming the current version succeeds even where the memory is stale.
    let request = parse_update(
        br#"{"state":{"reported":{"x":1}},"version":40}"#,
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(a.update(&k, &request, true).await.unwrap().document.version, 41);
}

/// An update that reports `n`.
fn report(n: u64) -> super::request::UpdateRequest {
    parse_update(
        format!(r#"{{"state":{{"reported":{{"n":{n}}}}}}}"#).as_bytes(),
        &Limits::default(),
    )
    .unwrap()
}

/// A read on one instance remembers the document; the other instance then updates it, deletes it and writes it
/// again. Each read on the first sees each change, though it asks Redis only whether its memory is current.
#[tokio::test]
async fn redis_reads_see_what_another_instance_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_redis_instances(&dir).await;
    let k = key("shared", None);
    a.update(&k, &report(1), true).await.unwrap();
    assert_eq!(a.get(&k, true).await.unwrap().reported.unwrap()["n"], 1);
    b.update(&k, &report(2), true).await.unwrap();
    let seen = a.get(&k, true).await.unwrap();
    assert_eq!((seen.version, seen.reported.unwrap()["n"].clone()), (2, json!(2)));
    b.delete(&k, &PlainRequest::default(), true).await.unwrap();
    assert_eq!(
        a.get(&k, true).await.unwrap_err().code(),
        404,
        "the delete is seen"
    );
    b.update(&k, &report(3), true).await.unwrap();
    let seen = a.get(&k, true).await.unwrap();
    assert_eq!((seen.version, seen.reported.unwrap()["n"].clone()), (3, json!(3)));
    // And the first instance's own write after all that starts from the latest version.
    assert_eq!(a.update(&k, &report(4), true).await.unwrap().document.version, 4);
}

/// An instance that missed a device's deletion (its purge notice) still holds the old document in memory; the
/// device is registered again and its shadow written to the same number of changes as before elsewhere. The
/// instance's next read sees the new document, not its memory: the versions continued past the purge.
#[tokio::test]
async fn redis_reads_after_a_missed_purge_see_the_new_document() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_redis_instances(&dir).await;
    let k = key("reborn", None);
    b.update(&k, &report(1), true).await.unwrap();
    assert_eq!(a.get(&k, true).await.unwrap().reported.unwrap()["n"], 1);
    b.purge(&k.device).await.unwrap();
    assert_eq!(a.get(&k, true).await.unwrap_err().code(), 404);
    assert_eq!(a.get(&k, true).await.unwrap_err().code(), 404);
    let updated = b.update(&k, &report(2), true).await.unwrap();
    assert_eq!(updated.document.version, 2, "the version continues");
    let seen = a.get(&k, true).await.unwrap();
    assert_eq!((seen.version, seen.reported.unwrap()["n"].clone()), (2, json!(2)));
}

/// A document as an earlier release stored it (see the `…_reads_the_older_storage_form` tests).
fn older_form_document() -> Document {
    Document::default().updated(
        &Patch::Merge(
            json!({"mode": "eco", "fan": {"speed": 2}})
                .as_object()
                .unwrap()
                .clone(),
        ),
        &Patch::Absent,
        1_795_000_000,
    )
}

/// The update after [`older_form_document`], which the store writes in the current form.
async fn update_older_form(shadows: &Shadows, k: &ShadowKey) -> super::Updated {
    let body = json!({"state": {"reported": {"mode": "eco"}}});
    let updated = shadows
        .update(
            k,
            &parse_update(body.to_string().as_bytes(), &Limits::default()).unwrap(),
            true,
        )
        .await
        .unwrap();
    assert_eq!(updated.document.version, 2);
    updated
}

/// Shadows written by an earlier release (`d` in the older storage form, no `t`) read back, and their next
/// update is stored in the current form.
#[tokio::test]
async fn redis_reads_the_older_storage_form() {
    let prefix = fresh_prefix();
    let dir = tempfile::tempdir().unwrap();
    let shadows = service(redis_at(&prefix).await, &dir).await;
    let older = older_form_document();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let hash = format!("{prefix}shadow/old-device/");
    let _: () = redis::cmd("HSET")
        .arg(&hash)
        .arg("d")
        .arg(older.to_stored_string())
        .arg("v")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let k = key("old-device", None);
    assert_eq!(shadows.get(&k, true).await.unwrap(), older);
    let updated = update_older_form(&shadows, &k).await;
    let (view, timestamp): (Vec<u8>, i64) = redis::cmd("HMGET")
        .arg(&hash)
        .arg("d")
        .arg("t")
        .query_async(&mut conn)
        .await
        .unwrap();
    let stored = Document::from_view(view.into(), timestamp).unwrap();
    assert_eq!(stored, *updated.document);
    assert_eq!(stored.desired.unwrap()["fan"]["speed"], 2);
}

/// Takes what a change hands over, wanting only the topics in `wants`.
struct Recorder {
    wants: Vec<String>,
    got: Vec<String>,
}

impl super::Courier for Recorder {
    fn deliver(&mut self, messages: Vec<super::Outgoing>) {
        self.got.extend(messages.into_iter().map(|m| m.topic));
    }

    fn wants(&self, topic: &str) -> bool {
        self.wants.iter().any(|w| w == topic)
    }
}

/// A reported update from `device`, handled as the session does: the topics of what it handed `courier`.
async fn report_to(shadows: &Shadows, device: &DeviceId, courier: &mut Recorder, t: u32) -> Vec<String> {
    let payload = format!(r#"{{"state":{{"reported":{{"t":{t}}}}}}}"#);
    let op = antumbra_wire::topics::ShadowOp::Update;
    shadows
        .handle_device_request(device, None, op, payload.as_bytes(), courier)
        .await;
    std::mem::take(&mut courier.got)
}

/// A device's update makes only the messages its courier wants (the session's: what the device subscribed to),
/// and is written all the same; a REST update still gets its `accepted` reply.
#[tokio::test]
async fn an_update_makes_only_the_messages_its_courier_wants() {
    let dir = tempfile::tempdir().unwrap();
    let shadows = service(embedded(&dir).await, &dir).await;
    let device = DeviceId::parse("want-1").unwrap();
    let k = key("want-1", None);
    let desired = parse_update(br#"{"state":{"desired":{"on":true}}}"#, &Limits::default()).unwrap();
    let updated = shadows.update(&k, &desired, true).await.unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&updated.accepted).unwrap();
    assert_eq!(
        (reply["version"].clone(), reply["state"]["desired"]["on"].clone()),
        (json!(1), json!(true))
    );

    let topic = |suffix: &str| format!("devices/want-1/shadow/update/{suffix}");
    let mut courier = Recorder {
        wants: vec![topic("delta")],
        got: Vec::new(),
    };
    assert_eq!(
        report_to(&shadows, &device, &mut courier, 1).await,
        [topic("delta")]
    );
    courier.wants = vec![topic("accepted"), topic("documents")];
    assert_eq!(
        report_to(&shadows, &device, &mut courier, 2).await,
        [topic("accepted"), topic("documents")]
    );
    courier.wants.clear();
    assert!(report_to(&shadows, &device, &mut courier, 3).await.is_empty());
    let stored = shadows.get(&k, true).await.unwrap();
    assert_eq!(
        (stored.version, stored.reported.unwrap()["t"].clone()),
        (4, json!(3))
    );
}

/// Every acknowledged write is in the file: a store opened afresh on it reads back the last version of each
/// shadow, deletes included.
#[tokio::test]
async fn the_embedded_store_reads_back_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shadows.db");
    {
        let store = EmbeddedStore::open(&path).await.unwrap();
        let mut tasks = Vec::new();
        for device in 0..20 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let k = key(&format!("d{device}"), None);
                for v in 1..=10u64 {
                    assert!(store
                        .compare_and_set(&k, v - 1, v, Some(&doc(v, json!({ "v": v }))))
                        .await
                        .unwrap());
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert!(store
            .compare_and_set(&key("d0", None), 10, 10, None)
            .await
            .unwrap());
    }
    let reopened = EmbeddedStore::open(&path).await.unwrap();
    for device in 1..20 {
        let stored = reopened.load(&key(&format!("d{device}"), None)).await.unwrap();
        assert_eq!(stored.version, 10);
        assert_eq!(stored.document, Some(doc(10, json!({"v": 10}))));
    }
    let deleted = reopened.load(&key("d0", None)).await.unwrap();
    assert_eq!((deleted.document, deleted.version), (None, 10));
}

/// An update is handed the document itself, not a copy of what the memory shares: the memory keeps its view,
/// from which a read rebuilds it meanwhile.
#[tokio::test]
async fn the_embedded_store_lends_its_document_to_an_update() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("shadows.db")).await.unwrap();
    let k = key("lent", None);
    assert!(store
        .compare_and_set(&k, 0, 1, Some(&doc(1, json!({"a": 1}))))
        .await
        .unwrap());
    let mut lent = store.load_for_update(&k).await.unwrap().document.unwrap();
    assert_eq!(Arc::strong_count(&lent), 1, "nobody else holds the lent document");
    let read = store.load(&k).await.unwrap().document.unwrap();
    assert_eq!(*read, *doc(1, json!({"a": 1})));
    assert!(!Arc::ptr_eq(&read, &lent));
    Arc::make_mut(&mut lent).apply(
        &Patch::Absent,
        &Patch::Merge(json!({"a": 2}).as_object().unwrap().clone()),
        11,
    );
    assert_eq!(*read, *doc(1, json!({"a": 1})), "the reader's copy is its own");
    assert!(store.compare_and_set(&k, 1, 2, Some(&lent)).await.unwrap());
    let now = store.load(&k).await.unwrap().document.unwrap();
    assert!(Arc::ptr_eq(&now, &lent), "the written document is shared again");
    // A shadow read from the file, then lent, is lent without a copy as well.
    drop((read, now, lent));
    let reopened = EmbeddedStore::open(&dir.path().join("shadows.db")).await.unwrap();
    let lent = reopened.load_for_update(&k).await.unwrap().document.unwrap();
    assert_eq!(Arc::strong_count(&lent), 1);
    assert_eq!(lent.reported.as_ref().unwrap()["a"], 2);
}

/// Files written by an earlier release (no `timestamp` column; documents in the older storage form) open, read
/// back, and take the next update in the current form.
#[tokio::test]
async fn the_embedded_store_reads_the_older_storage_form() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shadows.db");
    let older = older_form_document();
    let file = crate::db::connect(&crate::db::sqlite_url(&path)).await.unwrap();
    sqlx::query(
        "CREATE TABLE shadows (device_id TEXT NOT NULL, name TEXT NOT NULL, document TEXT, \
         version INTEGER NOT NULL, PRIMARY KEY (device_id, name))",
    )
    .execute(&file)
    .await
    .unwrap();
    sqlx::query("INSERT INTO shadows (device_id, name, document, version) VALUES ('old-device', '', ?, 1)")
        .bind(older.to_stored_string())
        .execute(&file)
        .await
        .unwrap();
    let store = Store::Embedded(EmbeddedStore::open(&path).await.unwrap());
    let shadows = service(store, &dir).await;
    let k = key("old-device", None);
    assert_eq!(shadows.get(&k, true).await.unwrap(), older);
    let updated = update_older_form(&shadows, &k).await;
    let (view, timestamp): (String, i64) =
        sqlx::query_as("SELECT document, timestamp FROM shadows WHERE device_id = 'old-device'")
            .fetch_one(&file)
            .await
            .unwrap();
    let stored = Document::from_view(view.into_bytes().into(), timestamp).unwrap();
    assert_eq!(stored, *updated.document);
    assert_eq!(stored.desired.unwrap()["fan"]["speed"], 2);
    let reopened = EmbeddedStore::open(&path).await.unwrap();
    assert_eq!(
        reopened.load(&k).await.unwrap().document.as_deref(),
        Some(&*updated.document)
    );
    drop(reopened);
    // An earlier release run again on this file writes the older form and leaves the timestamp as it was: the
    // row still reads.
    sqlx::query("UPDATE shadows SET document = ?, version = 3 WHERE device_id = 'old-device'")
        .bind(older.to_stored_string())
        .execute(&file)
        .await
        .unwrap();
    let again = EmbeddedStore::open(&path).await.unwrap();
    assert_eq!(again.load(&k).await.unwrap().document.as_deref(), Some(&older));
    // A purge takes the timestamp with the document.
    again.purge(&k.device).await.unwrap();
    let (document, timestamp): (Option<String>, Option<i64>) =
        sqlx::query_as("SELECT document, timestamp FROM shadows WHERE device_id = 'old-device'")
            .fetch_one(&file)
            .await
            .unwrap();
    assert_eq!((document, timestamp), (None, None));
}

/// Under writes that never pause, the embedded store's WAL still starts over: its checkpoints never run inside a
/// commit, and passive checkpoints alone (which never let it start over while writes keep coming) left ~100 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_stores_wal_stays_bounded_under_continuous_writes() {
    const WRITERS: usize = 64;
    const SHADOWS: usize = 50;
    const ROUNDS: u64 = 8;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shadows.db");
    let wal = dir.path().join("shadows.db-wal");
    let store = EmbeddedStore::open(&path).await.unwrap();
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (wal, writing) = (wal.clone(), writing.clone());
        tokio::spawn(async move {
            let mut largest = 0;
            while writing.load(std::sync::atomic::Ordering::SeqCst) {
                largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            largest
        })
    };
    // Every write lands on a page of its own (documents of ~1.5 KB over 3,200 shadows): one WAL frame each,
    // 25,600 frames (100 MiB of WAL) if it never started over.
    let filler = "x".repeat(1_500);
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let (store, filler) = (store.clone(), filler.clone());
        tasks.push(tokio::spawn(async move {
            for round in 1..=ROUNDS {
                for shadow in 0..SHADOWS {
                    let k = key(&format!("w{writer}-s{shadow}"), None);
                    let document = doc(round, json!({ "round": round, "filler": filler }));
                    assert!(store
                        .compare_and_set(&k, round - 1, round, Some(&document))
                        .await
                        .unwrap());
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    let largest = watcher.await.unwrap();
    assert!(
        largest > 0 && largest < 72 << 20,
        "the WAL reached {} MiB",
        largest >> 20
    );
    let reopened = EmbeddedStore::open(&path).await.unwrap();
    let last = reopened.load(&key("w7-s9", None)).await.unwrap();
    assert_eq!(last.version, ROUNDS);
}

/// Takes every message a change hands over, as (topic suffix after `shadow/`, payload), wanting all but
/// `documents` unless told; counts the deliveries.
#[derive(Default)]
struct Messages(Vec<(String, serde_json::Value)>, usize, bool);

impl super::Courier for Messages {
    fn deliver(&mut self, messages: Vec<super::Outgoing>) {
        self.1 += 1;
        for message in messages {
            let suffix = message
                .topic
                .split("/shadow/")
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            self.0
                .push((suffix, serde_json::from_slice(&message.payload).unwrap()));
        }
    }

    fn wants(&self, topic: &str) -> bool {
        self.2 || !topic.ends_with("/documents")
    }
}

/// Updates a device sent together (read in one go) are written together, and each is answered as it would be on
/// its own, in order: its version, its token, the delta it leaves. When one of them cannot apply, each goes on
/// its own, so the others still apply around it.
async fn updates_read_together_are_answered_one_by_one(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_state_bytes: 300,
        ..Limits::default()
    };
    let shadows = Shadows::new(store, limits, service_registry(&dir).await, EventBus::new()).0;
    let device = DeviceId::parse("grouped").unwrap();
    let run = |payloads: Vec<serde_json::Value>| {
        let (shadows, device) = (&shadows, &device);
        async move {
            let texts: Vec<String> = payloads.iter().map(|p| p.to_string()).collect();
            let bytes: Vec<&[u8]> = texts.iter().map(|t| t.as_bytes()).collect();
            let mut got = Messages::default();
            shadows
                .handle_device_updates(device, None, &bytes, &mut got)
                .await;
            let deliveries = got.1;
            let replies = got
                .0
                .into_iter()
                .map(|(suffix, reply)| {
                    let said = reply["code"].as_u64().or(reply["version"].as_u64()).unwrap_or(0);
                    (
                        suffix,
                        reply["clientToken"].as_str().unwrap_or("").to_owned(),
                        said,
                    )
                })
                .collect::<Vec<_>>();
            (replies, deliveries)
        }
    };
    let update = |token: &str, state: serde_json::Value| json!({"state": state, "clientToken": token});
    let (first, _) = run(vec![update("d", json!({"desired": {"mode": "eco"}}))]).await;
    let reply = |suffix: &str, token: &str, said: u64| (suffix.to_owned(), token.to_owned(), said);
    assert_eq!(
        first,
        [reply("update/accepted", "d", 1), reply("update/delta", "", 1)]
    );
    let (together, deliveries) = run(vec![
        update("t1", json!({"reported": {"a": 1}})),
        update("t2", json!({"reported": {"mode": "eco"}})),
        update("t3", json!({"reported": {"a": 3}})),
    ])
    .await;
    assert_eq!(
        together,
        [
            reply("update/accepted", "t1", 2),
            reply("update/delta", "", 2),
            reply("update/accepted", "t2", 3),
            reply("update/accepted", "t3", 4),
        ]
    );
    assert_eq!(deliveries, 1, "written and delivered together");
    let k = ShadowKey::classic(device.clone());
    let now = shadows.get(&k, true).await.unwrap();
    assert_eq!(now.version, 4);
    assert_eq!(now.reported, json!({"a": 3, "mode": "eco"}).as_object().cloned());
    // Unparsable, too large, or naming a version: the others still apply, each in its turn.
    let (mixed, deliveries) = run(vec![
        update("u1", json!({"reported": {"a": 5}})),
        json!({"state": {"reported": "not an object"}, "clientToken": "u2"}),
        update("u3", json!({"reported": {"big": "x".repeat(250)}})),
        json!({"state": {"reported": {"a": 6}}, "version": 1, "clientToken": "u4"}),
        update("u5", json!({"reported": {"a": 7}})),
    ])
    .await;
    assert_eq!(
        mixed,
        [
            reply("update/accepted", "u1", 5),
            reply("update/rejected", "u2", 400),
            reply("update/rejected", "u3", 413),
            reply("update/rejected", "u4", 409),
            reply("update/accepted", "u5", 6),
        ]
    );
    assert_eq!(deliveries, 5, "each on its own");
    let now = shadows.get(&k, true).await.unwrap();
    assert_eq!((now.version, now.reported.unwrap()["a"].clone()), (6, json!(7)));
    // An update that would pass the limit only on the way (grown by one, shrunk by the next) is refused alone.
    let (passing, _) = run(vec![
        update("v1", json!({"reported": {"big": "x".repeat(250)}})),
        update("v2", json!({"reported": {"big": null}})),
    ])
    .await;
    assert_eq!(
        passing,
        [
            reply("update/rejected", "v1", 413),
            reply("update/accepted", "v2", 7)
        ]
    );
    // A device that takes `documents` gets one per version, each with the version before it.
    let texts = [
        r#"{"state":{"reported":{"a":8}}}"#,
        r#"{"state":{"reported":{"a":9}}}"#,
    ];
    let bytes: Vec<&[u8]> = texts.iter().map(|t| t.as_bytes()).collect();
    let mut got = Messages(Vec::new(), 0, true);
    shadows
        .handle_device_updates(&device, None, &bytes, &mut got)
        .await;
    assert_eq!(got.1, 1, "written and delivered together");
    let documents: Vec<_> = got
        .0
        .iter()
        .filter(|(suffix, _)| suffix == "update/documents")
        .collect();
    let versions =
        |d: &serde_json::Value| (d["previous"]["version"].clone(), d["current"]["version"].clone());
    assert_eq!(documents.len(), 2);
    assert_eq!(versions(&documents[0].1), (json!(7), json!(8)));
    assert_eq!(versions(&documents[1].1), (json!(8), json!(9)));
    assert_eq!(documents[1].1["current"]["state"]["reported"]["a"], 9);
    assert_eq!(documents[1].1["previous"]["state"]["reported"]["a"], 8);
}

/// The bus hears of an update only when something reads it: an application watching here or, in a cluster,
/// elsewhere, or the OTA rollback check (an update of a classic shadow that reports its firmware). Every way an
/// update is applied: alone from REST, alone from MQTT, and grouped (updates a device sent together).
async fn an_update_is_announced_only_when_something_reads_it(store: Store) {
    use crate::events::PlatformEvent;
    let dir = tempfile::tempdir().unwrap();
    let events = EventBus::new();
    let registry = service_registry(&dir).await;
    let shadows = Shadows::new(store, Limits::default(), registry, events.clone()).0;
    let mut bus = events.subscribe();
    let mut heard = move || {
        let mut versions = Vec::new();
        while let Ok(event) = bus.try_recv() {
            if let PlatformEvent::ShadowUpdated {
                version,
                reported_firmware,
                name,
                ..
            } = event
            {
                versions.push((version, reported_firmware, name));
            }
        }
        versions
    };
    let device = DeviceId::parse("quiet").unwrap();
    let k = key("quiet", None);
    let report = |v: serde_json::Value| json!({"state": {"reported": v}}).to_string();
    let firmware = |v: &str| report(json!({"firmware": {"version": v}}));
    let update = |text: &str| parse_update(text.as_bytes(), &Limits::default()).unwrap();
    let rest = |text: String| {
        let (shadows, k, request) = (&shadows, &k, update(&text));
        async move { shadows.update(k, &request, true).await.unwrap() }
    };
    // What a session does with the updates of one read: one alone, several together.
    let mqtt = |texts: Vec<String>| {
        let (shadows, device) = (&shadows, &device);
        async move {
            let payloads: Vec<&[u8]> = texts.iter().map(|t| t.as_bytes()).collect();
            let mut courier = Messages::default();
            shadows
                .handle_device_updates(device, None, &payloads, &mut courier)
                .await;
            assert_eq!(courier.1, 1, "one delivery: alone, or applied together");
        }
    };
    let both = |a: serde_json::Value, b: serde_json::Value| vec![report(a), report(b)];

    rest(report(json!({"t": 1}))).await;
    mqtt(vec![report(json!({"t": 2}))]).await;
    mqtt(both(json!({"t": 3}), json!({"t": 4}))).await;
    let named = update(&firmware("2.0"));
    shadows
        .update(&key("quiet", Some("aux")), &named, true)
        .await
        .unwrap();
    assert_eq!(heard(), [], "nobody reads them: no event");

    rest(firmware("2.0")).await;
    mqtt(vec![firmware("2.1")]).await;
    mqtt(vec![report(json!({"t": 7})), firmware("2.2")]).await;
    assert_eq!(
        heard(),
        [
            (5, Some("2.0".to_owned()), None),
            (6, Some("2.1".to_owned()), None),
            (8, Some("2.2".to_owned()), None)
        ],
        "the OTA rollback check reads the firmware reports of the classic shadow"
    );

    let watching = events.watch();
    rest(report(json!({"t": 9}))).await;
    mqtt(vec![report(json!({"t": 10}))]).await;
    mqtt(both(json!({"t": 11}), json!({"t": 12}))).await;
    assert_eq!(
        heard(),
        [
            (9, None, None),
            (10, None, None),
            (11, None, None),
            (12, None, None)
        ],
        "watched here"
    );
    drop(watching);
    rest(report(json!({"t": 13}))).await;
    assert_eq!(heard(), [], "no longer watched");

    events.watched_elsewhere_until(tokio::time::Instant::now() + std::time::Duration::from_secs(60));
    mqtt(both(json!({"t": 14}), json!({"t": 15}))).await;
    rest(report(json!({"t": 16}))).await;
    assert_eq!(
        heard(),
        [(14, None, None), (15, None, None), (16, None, None)],
        "watched on another instance"
    );
    events.watched_elsewhere_until(tokio::time::Instant::now());
    rest(report(json!({"t": 17}))).await;
    assert_eq!(heard(), [], "the other instance's watch lapsed");
}

/// A device with a session on this instance exists without a registry query (REST requests for connected devices
/// cost no database round trip); once it left, or was deleted, the registry decides again. `ghost` is in no
/// registry.
#[tokio::test]
async fn a_device_connected_here_is_known_without_the_registry() {
    use crate::events::DisconnectReason;
    use crate::presence::Presence;
    let dir = tempfile::tempdir().unwrap();
    let events = EventBus::new();
    let registry = service_registry(&dir).await;
    let presence = Presence::load(&registry, events.clone(), None).await.unwrap();
    let shadows = Shadows::new(embedded(&dir).await, Limits::default(), registry, events)
        .0
        .with_presence(presence.clone());
    let device = DeviceId::parse("ghost").unwrap();
    let k = key("ghost", None);
    let request = parse_update(br#"{"state":{"desired":{"t":1}}}"#, &Limits::default()).unwrap();
    let unknown = |r: Result<super::Updated, ShadowError>| matches!(r, Err(ShadowError::UnknownDevice(_)));

    assert!(
        unknown(shadows.update(&k, &request, false).await),
        "not connected: the registry says no"
    );
    let (session, _) = presence.connected(&device, "127.0.0.1:9".into()).await;
    let updated = shadows.update(&k, &request, false).await.unwrap();
    assert_eq!(updated.document.version, 1);
    assert_eq!(shadows.get(&k, false).await.unwrap().version, 1);
    presence.disconnected(&device, session, DisconnectReason::ClientDisconnect);
    assert!(
        unknown(shadows.update(&k, &request, false).await),
        "gone: the registry says no again"
    );

    // Deleted while its session is still open (it ends on the deletion's event, a moment later).
    presence.connected(&device, "127.0.0.1:9".into()).await;
    shadows.update(&k, &request, false).await.unwrap();
    shadows.forget(&device);
    assert!(
        unknown(shadows.update(&k, &request, false).await),
        "deleted: no longer vouched for"
    );
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod embedded_store {
            $( #[tokio::test] async fn $name() {
                let dir = tempfile::tempdir().unwrap();
                super::$name(super::embedded(&dir).await).await
            } )*
        }
        mod redis_store {
            $( #[tokio::test] async fn $name() { super::$name(super::redis().await).await } )*
        }
    };
}

conformance!(
    compare_and_set_is_exact,
    versions_survive_delete_and_recreate,
    named_shadows_are_separate_and_purge_keeps_only_versions,
    concurrent_updates_never_lose_one,
    a_flood_on_one_shadow_is_refused_past_the_in_flight_limit,
    the_service_applies_aws_rules_end_to_end,
    updates_read_together_are_answered_one_by_one,
    an_update_is_announced_only_when_something_reads_it,
);
