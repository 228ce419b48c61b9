//! Parsing and checking shadow requests — everything a device or an application can send — before any store
//! is touched. Bad input becomes a [`ShadowError`] with an AWS-style numeric `code`, never a panic.

use serde_json::Value;

use super::document::{Object, Patch};

/// Limits, from configuration; the defaults are at least as generous as AWS IoT's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest `state` of a document or request, serialized, in bytes (AWS: 8 KB).
    pub max_state_bytes: usize,
    /// Deepest nesting of objects and arrays inside a section (AWS: 6 levels).
    pub max_depth: usize,
    /// Longest `clientToken`, in bytes (AWS: 64).
    pub max_client_token: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_state_bytes: 64 * 1024,
            max_depth: 8,
            max_client_token: 64,
        }
    }
}

/// Why a shadow request failed, with the AWS-style numeric code it answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShadowError {
    /// 400: not JSON.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// 400: JSON, but not a valid request.
    #[error("{0}")]
    BadRequest(String),
    /// 404: no such shadow.
    #[error("{0}")]
    NotFound(String),
    /// 404: no such device.
    #[error("{0}")]
    UnknownDevice(String),
    /// 409: the request's `version` is not the current one.
    #[error("version conflict: the current version is {current}")]
    VersionConflict {
        /// The current version.
        current: u64,
    },
    /// 413: state larger than allowed.
    #[error("{0}")]
    TooLarge(String),
    /// 429: too many requests in flight on one shadow (`MAX_IN_FLIGHT`), or the store kept losing races.
    #[error("too many requests; retry")]
    TooManyRequests,
    /// 503: the store does not answer.
    #[error("shadow store unavailable: {0}")]
    Unavailable(String),
    /// 503: the device registry (the database) does not answer.
    #[error("database unavailable: {0}")]
    DatabaseUnavailable(String),
    /// 500: anything else.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ShadowError {
    /// The AWS-style numeric code.
    pub fn code(&self) -> u16 {
        match self {
            Self::InvalidJson(_) | Self::BadRequest(_) => 400,
            Self::NotFound(_) | Self::UnknownDevice(_) => 404,
            Self::VersionConflict { .. } => 409,
            Self::TooLarge(_) => 413,
            Self::TooManyRequests => 429,
            Self::Unavailable(_) | Self::DatabaseUnavailable(_) => 503,
            Self::Internal(_) => 500,
        }
    }
}

/// A parsed `update` request.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateRequest {
    /// What to do with `desired`.
    pub desired: Patch,
    /// What to do with `reported`.
    pub reported: Patch,
    /// Echoed back in replies.
    pub client_token: Option<String>,
    /// When set, the update applies only to this version.
    pub version: Option<u64>,
}

/// A parsed `get` or `delete` request: only a `clientToken` (and, for delete, an optional `version`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PlainRequest {
    /// Echoed back in replies.
    pub client_token: Option<String>,
    /// Expected version.
    pub version: Option<u64>,
}

/// The `clientToken` of a payload, if it is readable, so even a rejection can echo it.
pub fn client_token_of(payload: &[u8], limits: &Limits) -> Option<String> {
    let value: Value = serde_json::from_slice(payload).ok()?;
    value
        .get("clientToken")?
        .as_str()
        .filter(|t| t.len() <= limits.max_client_token)
        .map(str::to_owned)
}

/// Parses an `update` payload.
pub fn parse_update(payload: &[u8], limits: &Limits) -> Result<UpdateRequest, ShadowError> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| ShadowError::InvalidJson(e.to_string()))?;
    update_from_value(value, limits)
}

/// Reads an `update` request that is already parsed JSON (the REST body); the same rules as [`parse_update`].
/// The request's sections are moved into its patches, not copied.
pub fn update_from_value(value: Value, limits: &Limits) -> Result<UpdateRequest, ShadowError> {
    let Value::Object(mut top) = value else {
        return Err(bad("the request must be a JSON object"));
    };
    let mut plain = PlainRequest::default();
    if let Some(other) = top
        .keys()
        .find(|k| !matches!(k.as_str(), "state" | "clientToken" | "version"))
    {
        return Err(bad(&format!(
            "unexpected field {other:?}; expected state, clientToken, version"
        )));
    }
    read_common(&top, limits, &mut plain)?;
    let Some(state) = top.remove("state") else {
        return Err(bad("missing field \"state\""));
    };
    let Value::Object(state) = state else {
        return Err(bad("\"state\" must be an object"));
    };
    for (key, value) in &state {
        match value {
            Value::Null => {}
            Value::Object(fields) => check_values(fields, 1, limits, key)?,
            _ => return Err(bad(&format!("\"state.{key}\" must be an object or null"))),
        }
        if !matches!(key.as_str(), "desired" | "reported") {
            return Err(bad(&format!(
                "unexpected section \"state.{key}\"; expected desired, reported"
            )));
        }
    }
    if state.is_empty() {
        return Err(bad("\"state\" must contain desired or reported"));
    }
    let size = super::document::json_size(&state);
    if size > limits.max_state_bytes {
        return Err(too_large(size, limits));
    }
    // Checked above: each section is `desired` or `reported`, and an object or null.
    let (mut desired, mut reported) = (Patch::Absent, Patch::Absent);
    for (key, value) in state {
        let patch = match value {
            Value::Object(fields) => Patch::Merge(fields),
            _ => Patch::Remove,
        };
        if key == "desired" {
            desired = patch;
        } else {
            reported = patch;
        }
    }
    Ok(UpdateRequest {
        desired,
        reported,
        client_token: plain.client_token,
        version: plain.version,
    })
}

/// Parses a `get` or `delete` payload; an empty payload is an empty request.
pub fn parse_plain(payload: &[u8], limits: &Limits) -> Result<PlainRequest, ShadowError> {
    let mut plain = PlainRequest::default();
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(plain);
    }
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| ShadowError::InvalidJson(e.to_string()))?;
    let Value::Object(top) = value else {
        return Err(bad("the request must be a JSON object"));
    };
    if let Some(other) = top.keys().find(|k| *k != "clientToken" && *k != "version") {
        return Err(bad(&format!(
            "unexpected field {other:?}; expected clientToken, version"
        )));
    }
    read_common(&top, limits, &mut plain)?;
    Ok(plain)
}

fn read_common(top: &Object, limits: &Limits, plain: &mut PlainRequest) -> Result<(), ShadowError> {
    match top.get("clientToken") {
        None => {}
        Some(Value::String(t)) if t.len() <= limits.max_client_token => plain.client_token = Some(t.clone()),
        Some(Value::String(_)) => {
            return Err(bad(&format!(
                "\"clientToken\" is longer than {} bytes",
                limits.max_client_token
            )))
        }
        Some(_) => return Err(bad("\"clientToken\" must be a string")),
    }
    match top.get("version") {
        None => {}
        Some(v) => match v.as_u64() {
            Some(n) => plain.version = Some(n),
            None => return Err(bad("\"version\" must be a non-negative integer")),
        },
    }
    Ok(())
}

/// Depth and array rules for the values of a section.
fn check_values(fields: &Object, depth: usize, limits: &Limits, section: &str) -> Result<(), ShadowError> {
    let root = Path::Section(section);
    for (key, value) in fields {
        check_value(value, depth, limits, &Path::Key(&root, key), false)?;
    }
    Ok(())
}

/// Where a value sits below `state`, written out only when an error names it.
enum Path<'a> {
    Section(&'a str),
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl std::fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Section(section) => f.write_str(section),
            Path::Key(parent, key) => write!(f, "{parent}.{key}"),
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

fn check_value(
    value: &Value,
    depth: usize,
    limits: &Limits,
    path: &Path<'_>,
    in_array: bool,
) -> Result<(), ShadowError> {
    match value {
        Value::Null if in_array => Err(bad(&format!("arrays may not contain null (at state.{path})"))),
        Value::Object(fields) if depth >= limits.max_depth && !fields.is_empty() => Err(bad(&format!(
            "state.{path} nests deeper than {} levels",
            limits.max_depth
        ))),
        Value::Array(items) if depth >= limits.max_depth && !items.is_empty() => Err(bad(&format!(
            "state.{path} nests deeper than {} levels",
            limits.max_depth
        ))),
        Value::Object(fields) => {
            for (key, inner) in fields {
                check_value(inner, depth + 1, limits, &Path::Key(path, key), in_array)?;
            }
            Ok(())
        }
        Value::Array(items) => {
            for (i, inner) in items.iter().enumerate() {
                check_value(inner, depth + 1, limits, &Path::Index(path, i), true)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn bad(message: &str) -> ShadowError {
    ShadowError::BadRequest(message.to_owned())
}

/// The 413 for a state of `size` bytes.
pub fn too_large(size: usize, limits: &Limits) -> ShadowError {
    ShadowError::TooLarge(format!(
        "state of {size} bytes exceeds the limit of {} bytes",
        limits.max_state_bytes
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(v: Value) -> Result<UpdateRequest, ShadowError> {
        parse_update(v.to_string().as_bytes(), &Limits::default())
    }

    #[test]
    fn a_full_update_parses() {
        let r = parse(
            json!({"state": {"desired": {"t": 1}, "reported": null}, "clientToken": "abc", "version": 4}),
        )
        .unwrap();
        assert_eq!(
            r.desired,
            Patch::Merge(json!({"t": 1}).as_object().unwrap().clone())
        );
        assert_eq!(r.reported, Patch::Remove);
        assert_eq!((r.client_token.as_deref(), r.version), (Some("abc"), Some(4)));
    }

    #[test]
    fn bad_requests_get_400_with_a_reason() {
        let cases = [
            json!([1]),
            json!({"state": 5}),
            json!({"state": {}}),
            json!({"state": {"desired": 5}}),
            json!({"state": {"desired": [1]}}),
            json!({"state": {"delta": {}}}),
            json!({"state": {"desired": {}}, "extra": 1}),
            json!({"state": {"desired": {"a": [1, null]}}}),
            json!({"state": {"desired": {"a": [[null]]}}}),
            json!({"state": {"desired": {}}, "version": "3"}),
            json!({"state": {"desired": {}}, "version": -1}),
            json!({"state": {"desired": {}}, "version": 1.5}),
            json!({"state": {"desired": {}}, "clientToken": 5}),
            json!({"state": {"desired": {}}, "clientToken": "x".repeat(65)}),
            json!({"desired": {}}),
        ];
        for case in cases {
            let err = parse(case.clone()).unwrap_err();
            assert_eq!(err.code(), 400, "{case}: {err}");
        }
        assert!(matches!(
            parse_update(b"{nope", &Limits::default()),
            Err(ShadowError::InvalidJson(_))
        ));
        assert!(matches!(
            parse_update(b"", &Limits::default()),
            Err(ShadowError::InvalidJson(_))
        ));
    }

    #[test]
    fn depth_and_size_limits_apply() {
        let limits = Limits {
            max_state_bytes: 100,
            max_depth: 3,
            max_client_token: 64,
        };
        let ok = json!({"state": {"desired": {"a": {"b": {"c": 1}}}}});
        assert!(parse_update(ok.to_string().as_bytes(), &limits).is_ok());
        let deep = json!({"state": {"desired": {"a": {"b": {"c": {"d": 1}}}}}});
        assert_eq!(
            parse_update(deep.to_string().as_bytes(), &limits)
                .unwrap_err()
                .code(),
            400
        );
        let big = json!({"state": {"desired": {"a": "x".repeat(200)}}});
        assert_eq!(
            parse_update(big.to_string().as_bytes(), &limits)
                .unwrap_err()
                .code(),
            413
        );
        assert_eq!(Limits::default().max_client_token, 64);
        assert!(Limits::default().max_state_bytes >= 8 * 1024 && Limits::default().max_depth >= 6);
    }

    #[test]
    fn get_and_delete_take_an_optional_token() {
        assert_eq!(
            parse_plain(b"", &Limits::default()).unwrap(),
            PlainRequest::default()
        );
        let r = parse_plain(br#"{"clientToken":"t1","version":3}"#, &Limits::default()).unwrap();
        assert_eq!((r.client_token.as_deref(), r.version), (Some("t1"), Some(3)));
        assert_eq!(
            parse_plain(br#"{"state":{}}"#, &Limits::default())
                .unwrap_err()
                .code(),
            400
        );
        assert_eq!(
            client_token_of(br#"{"clientToken":"z","state":5}"#, &Limits::default()).as_deref(),
            Some("z")
        );
    }

    proptest::proptest! {
        /// Arbitrary bytes and arbitrary JSON never panic the parser.
        #[test]
        fn the_parser_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse_update(&bytes, &Limits::default());
            let _ = parse_plain(&bytes, &Limits::default());
            let _ = client_token_of(&bytes, &Limits::default());
        }
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::*;
    use crate::shadow::document::Document;

    /// Any JSON at all, nulls and deep nesting included.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(10, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,4}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Arbitrary JSON as `state.desired` / `state.reported`, parsed and merged into an arbitrary document:
        /// never a panic, and anything accepted leaves a document within the limits' shape rules.
        #[test]
        fn parse_and_merge_never_panic(desired in any_json(), reported in any_json(), base in any_json(), token in any_json(), version in any_json()) {
            let limits = Limits::default();
            let body = json!({"state": {"desired": desired, "reported": reported}, "clientToken": token, "version": version});
            let base_body = json!({"state": {"desired": base}});
            let mut doc = Document::default();
            if let Ok(start) = parse_update(base_body.to_string().as_bytes(), &limits) {
                doc = doc.updated(&start.desired, &start.reported, 1);
            }
            if let Ok(request) = parse_update(body.to_string().as_bytes(), &limits) {
                let next = doc.updated(&request.desired, &request.reported, 2);
                // The serialized forms are byte for byte those of the `Value` forms.
                prop_assert_eq!(next.to_json_bytes(None), serde_json::to_vec(&next.to_json()).unwrap());
                prop_assert_eq!(next.to_stored_string(), next.to_stored().to_string());
                prop_assert_eq!(
                    next.state_size(),
                    json!({"desired": next.desired, "reported": next.reported}).to_string().len()
                );
                // What lets `state_over` skip the count: the view is never shorter than the state.
                prop_assert!(next.state_size() <= next.view_bytes().len());
                for limit in [next.state_size().saturating_sub(1), next.state_size()] {
                    prop_assert_eq!(next.state_over(limit), (next.state_size() > limit).then(|| next.state_size()));
                }
                let _ = next.delta_message();
                let view = Document::documents_view;
                let documents = json!({"previous": view(&doc), "current": view(&next), "timestamp": 2, "clientToken": "t\"1"});
                prop_assert_eq!(
                    crate::shadow::document::documents_message(Some(doc.view_bytes()), &next, Some("t\"1")),
                    serde_json::to_vec(&documents).unwrap()
                );
                prop_assert_eq!(Document::from_stored_str(&next.to_stored_string()).ok(), Some(next.clone()));
                // The Redis form (the `documents` view and the timestamp) reads back as the same document.
                prop_assert_eq!(Document::from_view(next.view_bytes().clone(), next.timestamp).ok(), Some(next.clone()));
                // In place is the same as a copy.
                let mut in_place = doc.clone();
                in_place.apply(&request.desired, &request.reported, 2);
                prop_assert_eq!(&in_place, &next);
                prop_assert_eq!(Document::from_stored(&next.to_stored()), Some(next));
            }
        }

        /// A number reads back from the stored view as the same number (serde_json's `float_roundtrip`; without
        /// it a float could come back a unit in the last place off, after a restart or a read of a lent document).
        #[test]
        fn numbers_read_back_exactly_from_the_view(x in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
            let reported = json!({"x": x}).as_object().unwrap().clone();
            use crate::shadow::document::Patch;
            let doc = Document::default().updated(&Patch::Absent, &Patch::Merge(reported), 1);
            prop_assert_eq!(Document::from_view(doc.view_bytes().clone(), doc.timestamp).ok(), Some(doc));
        }
    }
}
