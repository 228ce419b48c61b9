//! The shadow document and its rules, AWS IoT Device Shadow semantics: pure code, no I/O.
//!
//! - `desired` and `reported` are JSON objects; updates deep-merge into them; `null` deletes a field; a section
//!   set to `null` is removed; arrays are values, replaced whole.
//! - `delta` holds every desired field whose value differs from reported (missing in reported counts), nested.
//! - `metadata` mirrors the state: every leaf (and every array) carries `{"timestamp": <epoch seconds>}` of its
//!   last change.
//! - `version` grows by one on every accepted change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// A JSON object.
pub type Object = Map<String, Value>;

/// The metadata of an object's fields, in the same (sorted) order as a JSON object's.
pub type MetaMap = BTreeMap<String, Meta>;

/// The metadata of one field: when a leaf (or an array) was last written, or the metadata of an object's own
/// fields. On the wire and in storage a leaf is `{"timestamp": <epoch seconds>}` and a node is an object, as AWS
/// has them; in memory it is a number, which keeps a document's metadata cheap to clone, drop and serialize.
#[derive(Debug, Clone, PartialEq)]
pub enum Meta {
    /// Epoch seconds of the last write.
    Leaf(i64),
    /// An object's fields.
    Node(MetaMap),
}

impl Serialize for Meta {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Meta::Leaf(at) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("timestamp", at)?;
                map.end()
            }
            Meta::Node(fields) => fields.serialize(serializer),
        }
    }
}

/// A metadata object read back, or the number inside a leaf.
enum MetaEntry {
    Meta(Meta),
    Number(i64),
}

impl<'de> Deserialize<'de> for MetaEntry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = MetaEntry;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("shadow metadata: an object, or a timestamp")
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<MetaEntry, E> {
                Ok(MetaEntry::Number(v))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<MetaEntry, E> {
                i64::try_from(v)
                    .map(MetaEntry::Number)
                    .map_err(|_| E::custom("metadata timestamp out of range"))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<MetaEntry, A::Error> {
                let mut fields = MetaMap::new();
                let mut leaf = None;
                while let Some((key, entry)) = map.next_entry::<String, MetaEntry>()? {
                    match entry {
                        MetaEntry::Meta(meta) => {
                            fields.insert(key, meta);
                        }
                        MetaEntry::Number(at) if key == "timestamp" => leaf = Some(at),
                        MetaEntry::Number(_) => {
                            return Err(serde::de::Error::custom("a number where metadata was expected"))
                        }
                    }
                }
                match leaf {
                    Some(at) if fields.is_empty() => Ok(MetaEntry::Meta(Meta::Leaf(at))),
                    Some(_) => Err(serde::de::Error::custom(
                        "a timestamp beside other metadata fields",
                    )),
                    None => Ok(MetaEntry::Meta(Meta::Node(fields))),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl<'de> Deserialize<'de> for Meta {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match MetaEntry::deserialize(deserializer)? {
            MetaEntry::Meta(meta) => Ok(meta),
            MetaEntry::Number(_) => Err(serde::de::Error::custom("a number where metadata was expected")),
        }
    }
}

/// A stored shadow document.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Document {
    /// Desired state, if any.
    pub desired: Option<Object>,
    /// Reported state, if any.
    pub reported: Option<Object>,
    /// Metadata mirror of `desired`.
    pub desired_meta: MetaMap,
    /// Metadata mirror of `reported`.
    pub reported_meta: MetaMap,
    /// Version of this document.
    pub version: u64,
    /// Time of the last change, epoch seconds.
    pub timestamp: i64,
    /// This document's `documents` view, serialized once: an update sends it as `current`, the next update as
    /// `previous`.
    pub view: ViewCache,
}

/// Serialized views remembered with their document: the `documents` view and the client view (`get`, REST).
/// It is a cache, not part of the value: documents compare equal whatever it holds, and a clone (the start of
/// the next version) starts empty.
#[derive(Default)]
pub struct ViewCache {
    documents: std::sync::OnceLock<bytes::Bytes>,
    client: std::sync::OnceLock<Box<[u8]>>,
}

impl Clone for ViewCache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for ViewCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for ViewCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewCache")
            .field("documents", &self.documents.get().is_some())
            .field("client", &self.client.get().is_some())
            .finish()
    }
}

/// What an update does to one section.
#[derive(Debug, Clone, PartialEq)]
pub enum Patch {
    /// The section is not in the request.
    Absent,
    /// `null`: remove the whole section.
    Remove,
    /// Merge these fields (a `null` field deletes it).
    Merge(Object),
}

impl Document {
    /// The delta: desired fields whose values differ from reported.
    pub fn delta(&self) -> Object {
        match &self.desired {
            Some(desired) => delta(desired, self.reported.as_ref().unwrap_or(&Object::new())),
            None => Object::new(),
        }
    }

    /// Applies both patches at `now` and returns the next version of the document (version + 1).
    pub fn updated(&self, desired: &Patch, reported: &Patch, now: i64) -> Document {
        let mut next = self.clone();
        next.apply(desired, reported, now);
        next
    }

    /// [`Document::updated`] in place: this document becomes the next version (its serialized views are
    /// forgotten). An update of a document nobody else holds changes it where it is, with no copy of the old
    /// version to make and none to free.
    pub fn apply(&mut self, desired: &Patch, reported: &Patch, now: i64) {
        apply_patch(&mut self.desired, &mut self.desired_meta, desired, now);
        apply_patch(&mut self.reported, &mut self.reported_meta, reported, now);
        self.version += 1;
        self.timestamp = now;
        self.view = ViewCache::default();
    }

    /// The firmware version the device reports (`reported.firmware.version`), which OTA goes by.
    pub fn firmware_version(&self) -> Option<&str> {
        self.reported.as_ref()?.get("firmware")?.get("version")?.as_str()
    }

    /// The document as clients see it (`get` replies, REST): state with delta, metadata, version, timestamp.
    pub fn to_json(&self) -> Value {
        let mut state = Object::new();
        let mut metadata = Object::new();
        if let Some(desired) = &self.desired {
            state.insert("desired".into(), Value::Object(desired.clone()));
            metadata.insert("desired".into(), meta_value(&self.desired_meta));
        }
        if let Some(reported) = &self.reported {
            state.insert("reported".into(), Value::Object(reported.clone()));
            metadata.insert("reported".into(), meta_value(&self.reported_meta));
        }
        let delta = self.delta();
        if !delta.is_empty() {
            state.insert("delta".into(), Value::Object(delta));
        }
        json!({ "state": state, "metadata": metadata, "version": self.version, "timestamp": self.timestamp })
    }

    /// The delta message (`…/update/delta`), or `None` when desired and reported agree.
    pub fn delta_message(&self) -> Option<Value> {
        let delta = self.delta();
        if delta.is_empty() {
            return None;
        }
        let metadata = restrict(&self.desired_meta, &delta);
        Some(
            json!({ "state": delta, "metadata": metadata, "version": self.version, "timestamp": self.timestamp }),
        )
    }

    /// Storage form: everything, including empty metadata.
    pub fn to_stored(&self) -> Value {
        json!({
            "desired": self.desired, "reported": self.reported,
            "desired_meta": self.desired_meta, "reported_meta": self.reported_meta,
            "version": self.version, "timestamp": self.timestamp,
        })
    }

    /// Reads the storage form back; `None` when it is not one.
    pub fn from_stored(value: &Value) -> Option<Document> {
        let section = |name: &str| match value.get(name) {
            Some(Value::Object(o)) => Some(Some(o.clone())),
            Some(Value::Null) | None => Some(None),
            _ => None,
        };
        let meta = |name: &str| value.get(name).and_then(|m| MetaMap::deserialize(m).ok());
        Some(Document {
            desired: section("desired")?,
            reported: section("reported")?,
            desired_meta: meta("desired_meta")?,
            reported_meta: meta("reported_meta")?,
            version: value.get("version")?.as_u64()?,
            timestamp: value.get("timestamp")?.as_i64()?,
            view: ViewCache::default(),
        })
    }
}

// ---- wire and storage forms, serialized straight from the document (no intermediate `Value`, no clone) -----
//
// Field order is alphabetical, as in a `serde_json::Map` (a BTreeMap here), so these bytes are the same as
// those of `to_json()` / `to_stored()` serialized.

#[derive(Serialize)]
struct Sections<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    desired: Option<&'a MetaMap>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reported: Option<&'a MetaMap>,
}

#[derive(Serialize)]
struct State<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<&'a Object>,
    #[serde(skip_serializing_if = "Option::is_none")]
    desired: Option<&'a Object>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reported: Option<&'a Object>,
}

/// The client view (`to_json`), or the `documents` view (no delta, no timestamp).
#[derive(Serialize)]
struct View<'a> {
    #[serde(rename = "clientToken", skip_serializing_if = "Option::is_none")]
    client_token: Option<&'a str>,
    metadata: Sections<'a>,
    state: State<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<i64>,
    version: u64,
}

impl<'a> View<'a> {
    fn new(
        d: &'a Document,
        delta: Option<&'a Object>,
        timestamp: Option<i64>,
        token: Option<&'a str>,
    ) -> Self {
        View {
            client_token: token,
            metadata: Sections {
                desired: d.desired.as_ref().map(|_| &d.desired_meta),
                reported: d.reported.as_ref().map(|_| &d.reported_meta),
            },
            state: State {
                delta,
                desired: d.desired.as_ref(),
                reported: d.reported.as_ref(),
            },
            timestamp,
            version: d.version,
        }
    }
}

#[derive(Serialize)]
struct StoredRef<'a> {
    desired: &'a Option<Object>,
    desired_meta: &'a MetaMap,
    reported: &'a Option<Object>,
    reported_meta: &'a MetaMap,
    timestamp: i64,
    version: u64,
}

#[derive(Deserialize)]
struct StoredOwned {
    desired: Option<Object>,
    desired_meta: MetaMap,
    reported: Option<Object>,
    reported_meta: MetaMap,
    timestamp: i64,
    version: u64,
}

/// The length of `value` serialized as compact JSON, counted without writing it anywhere.
pub(crate) fn json_size<T: Serialize + ?Sized>(value: &T) -> usize {
    let mut counter = Counter(0);
    match serde_json::to_writer(&mut counter, value) {
        Ok(()) => counter.0,
        Err(_) => usize::MAX,
    }
}

/// Counts bytes instead of keeping them.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Document {
    /// [`Document::to_json`], serialized, with an optional `clientToken` (the `get` reply).
    pub fn to_json_bytes(&self, client_token: Option<&str>) -> Vec<u8> {
        let view = self.client_bytes();
        // `clientToken` sorts first, so the reply is the view with the token spliced in after its `{`.
        let mut out = Vec::with_capacity(view.len() + client_token.map_or(0, |t| t.len() + 24));
        out.push(b'{');
        push_token(&mut out, client_token);
        out.extend_from_slice(&view[1..]);
        out
    }

    /// The client view without a token, serialized the first time it is asked for (REST `GET` and `get` serve
    /// the same version many times).
    pub fn client_bytes(&self) -> &[u8] {
        self.view.client.get_or_init(|| {
            let delta = self.delta();
            let delta = (!delta.is_empty()).then_some(&delta);
            serde_json::to_vec(&View::new(self, delta, Some(self.timestamp), None))
                .unwrap_or_default()
                .into_boxed_slice()
        })
    }

    /// [`Document::to_stored`], serialized.
    pub fn to_stored_string(&self) -> String {
        serde_json::to_string(&StoredRef {
            desired: &self.desired,
            desired_meta: &self.desired_meta,
            reported: &self.reported,
            reported_meta: &self.reported_meta,
            timestamp: self.timestamp,
            version: self.version,
        })
        .unwrap_or_default()
    }

    /// Reads a serialized storage form back.
    pub fn from_stored_str(text: &str) -> Result<Document, String> {
        let s: StoredOwned = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Ok(Document {
            desired: s.desired,
            reported: s.reported,
            desired_meta: s.desired_meta,
            reported_meta: s.reported_meta,
            version: s.version,
            timestamp: s.timestamp,
            view: ViewCache::default(),
        })
    }

    /// The state's size ([`Document::state_size`]) when it is over `limit`. The `documents` view holds the
    /// same sections plus metadata and version, so it is never shorter: when the view (serialized once per
    /// version anyway, for the store and the `documents` message) fits, the state fits and is not counted.
    pub fn state_over(&self, limit: usize) -> Option<usize> {
        if self.view_bytes().len() <= limit {
            return None;
        }
        Some(self.state_size()).filter(|size| *size > limit)
    }

    /// Bytes of `{"desired":…,"reported":…}` serialized: the size the state limit applies to.
    pub fn state_size(&self) -> usize {
        #[derive(Serialize)]
        struct Both<'a> {
            desired: &'a Option<Object>,
            reported: &'a Option<Object>,
        }
        json_size(&Both {
            desired: &self.desired,
            reported: &self.reported,
        })
    }
}

impl Document {
    /// The `documents` view of this document (state and metadata, no delta, no timestamp), serialized the first
    /// time it is asked for. It is also the Redis store's form of the document (with the timestamp beside it).
    pub fn view_bytes(&self) -> &bytes::Bytes {
        self.view.documents.get_or_init(|| {
            serde_json::to_vec(&View::new(self, None, None, None))
                .unwrap_or_default()
                .into()
        })
    }

    /// Reads a `documents` view back ([`Document::view_bytes`]) with the document's timestamp; the bytes are
    /// kept as its serialized view.
    pub fn from_view(view: bytes::Bytes, timestamp: i64) -> Result<Document, String> {
        let v: ViewOwned = serde_json::from_slice(&view).map_err(|e| e.to_string())?;
        let document = Document {
            desired_meta: v.metadata.desired.unwrap_or_default(),
            reported_meta: v.metadata.reported.unwrap_or_default(),
            desired: v.state.desired,
            reported: v.state.reported,
            version: v.version,
            timestamp,
            view: ViewCache::default(),
        };
        let _ = document.view.documents.set(view);
        Ok(document)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewOwned {
    metadata: SectionsOwned,
    state: StateOwned,
    version: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SectionsOwned {
    #[serde(default)]
    desired: Option<MetaMap>,
    #[serde(default)]
    reported: Option<MetaMap>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateOwned {
    #[serde(default)]
    desired: Option<Object>,
    #[serde(default)]
    reported: Option<Object>,
}

#[cfg(test)]
impl Document {
    /// The `documents` view built as a `Value`: the client view without its delta and timestamp.
    pub(crate) fn documents_view(&self) -> Value {
        let mut v = self.to_json();
        if let Some(state) = v["state"].as_object_mut() {
            state.remove("delta");
        }
        if let Some(v) = v.as_object_mut() {
            v.remove("timestamp");
        }
        v
    }
}

/// The `…/update/documents` message: both versions (state and metadata, no delta), the time, the token. Each
/// version's view is serialized once in its life (see [`ViewCache`]); the message is put together from them,
/// with the fields in the same (alphabetical) order as every other message.
pub fn documents_message(previous_view: Option<&[u8]>, current: &Document, token: Option<&str>) -> Vec<u8> {
    let current_view = current.view_bytes();
    let mut out = Vec::with_capacity(64 + current_view.len() + previous_view.map_or(4, <[u8]>::len));
    out.push(b'{');
    push_token(&mut out, token);
    out.extend_from_slice(b"\"current\":");
    out.extend_from_slice(current_view);
    out.extend_from_slice(b",\"previous\":");
    out.extend_from_slice(previous_view.unwrap_or(b"null"));
    out.extend_from_slice(format!(",\"timestamp\":{}}}", current.timestamp).as_bytes());
    out
}

/// `"clientToken":"…",` when there is a token: the first field of a reply whose `{` is already written.
fn push_token(out: &mut Vec<u8>, token: Option<&str>) {
    if let Some(token) = token {
        out.extend_from_slice(b"\"clientToken\":");
        // A string always serializes.
        let _ = serde_json::to_writer(&mut *out, token);
        out.push(b',');
    }
}

fn apply_patch(section: &mut Option<Object>, meta: &mut MetaMap, patch: &Patch, now: i64) {
    match patch {
        Patch::Absent => {}
        Patch::Remove => {
            *section = None;
            meta.clear();
        }
        Patch::Merge(fields) => merge(section.get_or_insert_with(Object::new), meta, fields, now),
    }
}

/// Deep merge: `null` deletes, objects merge into objects, anything else replaces.
fn merge(target: &mut Object, meta: &mut MetaMap, patch: &Object, now: i64) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
                meta.remove(key);
            }
            Value::Object(fields) => match target.get_mut(key) {
                Some(Value::Object(existing)) => {
                    // An object written where a leaf was (or no metadata at all) starts an empty node.
                    if !matches!(meta.get(key), Some(Meta::Node(_))) {
                        meta.insert(key.clone(), Meta::Node(MetaMap::new()));
                    }
                    if let Some(Meta::Node(child_meta)) = meta.get_mut(key) {
                        merge(existing, child_meta, fields, now);
                    }
                }
                _ => {
                    let fresh = without_nulls(fields);
                    meta.insert(key.clone(), Meta::Node(object_metadata(&fresh, now)));
                    target.insert(key.clone(), Value::Object(fresh));
                }
            },
            other => {
                target.insert(key.clone(), other.clone());
                meta.insert(key.clone(), Meta::Leaf(now));
            }
        }
    }
}

/// Metadata for a value just written: objects mirror their fields, everything else is a leaf.
pub fn metadata_of(value: &Value, now: i64) -> Meta {
    match value {
        Value::Object(fields) => Meta::Node(object_metadata(fields, now)),
        _ => Meta::Leaf(now),
    }
}

fn object_metadata(fields: &Object, now: i64) -> MetaMap {
    fields
        .iter()
        .map(|(k, v)| (k.clone(), metadata_of(v, now)))
        .collect()
}

/// Metadata as a JSON value (the `Value` forms of a document).
fn meta_value(meta: &MetaMap) -> Value {
    serde_json::to_value(meta).unwrap_or_default()
}

/// A new object written into an empty place: its `null` fields mean "absent".
fn without_nulls(fields: &Object) -> Object {
    fields
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| match v {
            Value::Object(inner) => (k.clone(), Value::Object(without_nulls(inner))),
            other => (k.clone(), other.clone()),
        })
        .collect()
}

/// Every field of `desired` whose value differs from `reported`, nested objects compared field by field.
pub fn delta(desired: &Object, reported: &Object) -> Object {
    let mut out = Object::new();
    for (key, want) in desired {
        match (want, reported.get(key)) {
            (Value::Object(want), Some(Value::Object(have))) => {
                let inner = delta(want, have);
                if !inner.is_empty() {
                    out.insert(key.clone(), Value::Object(inner));
                }
            }
            (want, Some(have)) if same(want, have) => {}
            (want, _) => {
                out.insert(key.clone(), want.clone());
            }
        }
    }
    out
}

/// The part of a metadata tree that covers the fields of `state`.
fn restrict(meta: &MetaMap, state: &Object) -> MetaMap {
    state
        .iter()
        .filter_map(|(key, value)| {
            let m = meta.get(key)?;
            match (value, m) {
                (Value::Object(inner), Meta::Node(inner_meta)) => {
                    Some((key.clone(), Meta::Node(restrict(inner_meta, inner))))
                }
                _ => Some((key.clone(), m.clone())),
            }
        })
        .collect()
}

/// Metadata echoed in an `accepted` reply: the request's fields, each stamped with `now` (`null`s included). The
/// reply itself serializes it without building it (`shadow::Stamped`); this `Value` form is the tests' reference.
#[cfg(test)]
pub fn request_metadata(patch: &Object, now: i64) -> Object {
    patch
        .iter()
        .map(|(k, v)| match v {
            Value::Object(inner) => (k.clone(), Value::Object(request_metadata(inner, now))),
            _ => (k.clone(), json!({ "timestamp": now })),
        })
        .collect()
}

/// Whether every field of `desired` is in `reported` with the same value (nested).
pub fn contained(desired: &Object, reported: &Object) -> bool {
    desired.iter().all(|(k, v)| match (v, reported.get(k)) {
        (Value::Object(want), Some(Value::Object(have))) => contained(want, have),
        (want, Some(have)) => same(want, have),
        (_, None) => false,
    })
}

/// Equality of JSON values with numbers compared as numbers: `21` and `21.0` are one value, so a device whose
/// JSON writer prints every number as a float (Python's `21.0`, a C `printf("%f")`) is not sent a delta for ever.
/// Arrays and objects compare element by element; everything else as written.
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests;
