use proptest::prelude::*;
use serde_json::json;

use super::*;

fn obj(v: Value) -> Object {
    v.as_object().unwrap().clone()
}

/// Metadata as its JSON object.
fn meta(m: &MetaMap) -> Object {
    obj(serde_json::to_value(m).unwrap())
}

fn doc(desired: Value, reported: Value) -> Document {
    Document::default().updated(&Patch::Merge(obj(desired)), &Patch::Merge(obj(reported)), 100)
}

#[test]
fn updates_deep_merge_and_null_deletes() {
    let d = doc(
        json!({"light": {"color": "red", "level": 3}, "fan": 1}),
        json!({}),
    );
    let d = d.updated(
        &Patch::Merge(obj(
            json!({"light": {"color": "blue", "level": null}, "fan": null}),
        )),
        &Patch::Absent,
        200,
    );
    assert_eq!(d.desired, Some(obj(json!({"light": {"color": "blue"}}))));
    assert_eq!(
        meta(&d.desired_meta),
        obj(json!({"light": {"color": {"timestamp": 200}}}))
    );
    assert_eq!(d.version, 2);
    assert_eq!(d.timestamp, 200);
}

#[test]
fn a_section_set_to_null_is_removed_and_arrays_are_replaced_whole() {
    let d = doc(json!({"list": [1, 2, 3]}), json!({"x": 1}));
    let d = d.updated(&Patch::Merge(obj(json!({"list": [9]}))), &Patch::Remove, 300);
    assert_eq!(d.desired, Some(obj(json!({"list": [9]}))));
    assert_eq!(meta(&d.desired_meta), obj(json!({"list": {"timestamp": 300}})));
    assert_eq!(d.reported, None);
    assert!(d.reported_meta.is_empty());
}

#[test]
fn delta_is_nested_and_counts_missing_fields() {
    let d = doc(
        json!({"light": {"color": "red", "level": 3}, "mode": "eco", "same": true}),
        json!({"light": {"color": "red", "level": 1}, "same": true}),
    );
    assert_eq!(d.delta(), obj(json!({"light": {"level": 3}, "mode": "eco"})));
    let message = d.delta_message().unwrap();
    assert_eq!(message["state"], json!({"light": {"level": 3}, "mode": "eco"}));
    assert_eq!(
        message["metadata"],
        json!({"light": {"level": {"timestamp": 100}}, "mode": {"timestamp": 100}})
    );
    assert_eq!(message["version"], 1);
    let synced = d.updated(&Patch::Absent, &Patch::Merge(d.delta()), 101);
    assert!(synced.delta_message().is_none());
}

#[test]
fn numbers_are_compared_as_numbers() {
    let d = doc(
        json!({"temp": 21, "fan": {"speed": 2.0}, "list": [1, 2.5], "half": 0.5, "cfg": [{"a": 1}]}),
        json!({"temp": 21.0, "fan": {"speed": 2}, "list": [1.0, 2.5], "half": 0.5, "cfg": [{"a": 1.0}]}),
    );
    assert!(d.delta().is_empty(), "{:?}", d.delta());
    let d = doc(
        json!({"temp": 21, "list": [1, 2]}),
        json!({"temp": 21.5, "list": [1.0, 2.0, 3]}),
    );
    assert_eq!(d.delta(), obj(json!({"temp": 21, "list": [1, 2]})));
    assert!(!same(&json!(1), &json!("1")));
    assert!(!same(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
    assert!(same(&json!(-3), &json!(-3.0)));
}

#[test]
fn new_objects_drop_their_null_fields_and_get_full_metadata() {
    let d = doc(json!({"cfg": {"a": 1, "b": null, "c": {"d": "x"}}}), json!({}));
    assert_eq!(d.desired, Some(obj(json!({"cfg": {"a": 1, "c": {"d": "x"}}}))));
    assert_eq!(
        meta(&d.desired_meta),
        obj(json!({"cfg": {"a": {"timestamp": 100}, "c": {"d": {"timestamp": 100}}}}))
    );
}

#[test]
fn a_leaf_replaced_by_an_object_and_back_keeps_metadata_in_shape() {
    let d = doc(json!({"v": 1}), json!({}));
    let d = d.updated(&Patch::Merge(obj(json!({"v": {"x": 1}}))), &Patch::Absent, 150);
    assert_eq!(
        meta(&d.desired_meta),
        obj(json!({"v": {"x": {"timestamp": 150}}}))
    );
    let d = d.updated(&Patch::Merge(obj(json!({"v": 2}))), &Patch::Absent, 160);
    assert_eq!(meta(&d.desired_meta), obj(json!({"v": {"timestamp": 160}})));
}

#[test]
fn the_client_view_has_state_delta_metadata_version_and_timestamp() {
    let d = doc(json!({"t": 21}), json!({"t": 19}));
    let view = d.to_json();
    assert_eq!(view["state"]["desired"], json!({"t": 21}));
    assert_eq!(view["state"]["reported"], json!({"t": 19}));
    assert_eq!(view["state"]["delta"], json!({"t": 21}));
    assert_eq!(view["metadata"]["reported"]["t"]["timestamp"], 100);
    assert_eq!(
        (view["version"].clone(), view["timestamp"].clone()),
        (json!(1), json!(100))
    );
    assert_eq!(Document::from_stored(&d.to_stored()), Some(d.clone()));
    let mut with_token = view.clone();
    with_token["clientToken"] = json!("c-9");
    assert_eq!(
        d.to_json_bytes(Some("c-9")),
        serde_json::to_vec(&with_token).unwrap()
    );
}

#[test]
fn the_documents_message_has_both_views_without_delta_or_their_timestamps() {
    let before = doc(json!({"t": 21}), json!({"t": 19}));
    let after = before.updated(&Patch::Absent, &Patch::Merge(obj(json!({"t": 21}))), 130);
    let view = Document::documents_view;
    let expected =
        json!({"previous": view(&before), "current": view(&after), "timestamp": 130, "clientToken": "k"});
    assert_eq!(
        documents_message(Some(before.view_bytes()), &after, Some("k")),
        serde_json::to_vec(&expected).unwrap()
    );
    let first = json!({"previous": null, "current": view(&before), "timestamp": 100});
    assert_eq!(
        documents_message(None, &before, None),
        serde_json::to_vec(&first).unwrap()
    );
}

// ---- laws, over arbitrary documents and patches -------------------------------------------------------------

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::from),
        (-5i64..5).prop_map(Value::from),
        // The same numbers written as floats (`2.0`), and one that is not whole.
        (-5i64..5).prop_map(|n| Value::from(n as f64)),
        Just(Value::from(0.5)),
        "[a-c]{0,2}".prop_map(Value::from),
        prop::collection::vec((-3i64..3).prop_map(Value::from), 0..3).prop_map(Value::Array),
    ]
}

/// Objects over a small key set, so patches and documents overlap often.
fn state(depth: u32) -> impl Strategy<Value = Object> {
    let value = leaf().prop_recursive(depth, 24, 4, |inner| {
        prop::collection::btree_map("[a-d]", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect()))
    });
    prop::collection::btree_map("[a-d]", value, 0..5).prop_map(|m| m.into_iter().collect())
}

/// Patches may also delete (`null`) at any level.
fn patch() -> impl Strategy<Value = Object> {
    let value = prop_oneof![4 => leaf(), 1 => Just(Value::Null)].prop_recursive(3, 24, 4, |inner| {
        prop::collection::btree_map("[a-d]", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect()))
    });
    prop::collection::btree_map("[a-d]", value, 0..5).prop_map(|m| m.into_iter().collect())
}

fn paths(object: &Object, prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, Value)>) {
    for (k, v) in object {
        prefix.push(k.clone());
        match v {
            Value::Object(inner) if !inner.is_empty() => paths(inner, prefix, out),
            other => out.push((prefix.clone(), other.clone())),
        }
        prefix.pop();
    }
}

fn touched(patch: &Object, path: &[String]) -> bool {
    match patch.get(&path[0]) {
        None => false,
        Some(Value::Object(inner)) if path.len() > 1 => touched(inner, &path[1..]),
        Some(_) => true,
    }
}

fn lookup<'a>(object: &'a Object, path: &[String]) -> Option<&'a Value> {
    let value = object.get(&path[0])?;
    if path.len() == 1 {
        return Some(value);
    }
    lookup(value.as_object()?, &path[1..])
}

proptest! {
    #[test]
    fn delta_is_empty_exactly_when_desired_is_contained_in_reported(desired in state(3), reported in state(3)) {
        prop_assert_eq!(delta(&desired, &reported).is_empty(), contained(&desired, &reported));
    }

    #[test]
    fn reporting_the_delta_empties_it(desired in state(3), reported in state(3)) {
        let d = doc(Value::Object(desired), Value::Object(reported));
        let synced = d.updated(&Patch::Absent, &Patch::Merge(d.delta()), 200);
        prop_assert!(synced.delta().is_empty(), "left {:?}", synced.delta());
    }

    #[test]
    fn a_merge_never_loses_a_field_it_did_not_touch(base in state(3), p in patch()) {
        let d = doc(Value::Object(base.clone()), json!({}));
        let next = d.updated(&Patch::Merge(p.clone()), &Patch::Absent, 200);
        let merged = next.desired.clone().unwrap_or_default();
        let mut all = Vec::new();
        paths(&base, &mut Vec::new(), &mut all);
        for (path, value) in all {
            if !(1..=path.len()).any(|n| touched(&p, &path[..n])) {
                prop_assert_eq!(lookup(&merged, &path), Some(&value), "path {:?}", path);
            }
        }
        // And every non-null leaf the patch wrote is there.
        let mut written = Vec::new();
        paths(&p, &mut Vec::new(), &mut written);
        for (path, value) in written {
            // (An empty object in a patch merges nothing, so only scalar leaves are checked.)
            if !value.is_null() && !value.is_object() && !(1..path.len()).any(|n| lookup(&p, &path[..n]).is_some_and(Value::is_null)) {
                if let Some(found) = lookup(&merged, &path) {
                    prop_assert_eq!(found, &value);
                }
            }
        }
    }

    #[test]
    fn versions_only_grow(base in state(2), patches in prop::collection::vec(patch(), 1..6)) {
        let mut d = doc(Value::Object(base), json!({}));
        for p in patches {
            let next = d.updated(&Patch::Merge(p.clone()), &Patch::Merge(p), d.timestamp + 1);
            prop_assert_eq!(next.version, d.version + 1);
            d = next;
        }
    }

    #[test]
    fn metadata_always_mirrors_the_state_shape(base in state(3), p in patch()) {
        let d = doc(Value::Object(base), json!({}));
        let next = d.updated(&Patch::Merge(p), &Patch::Absent, 300);
        let state = next.desired.unwrap_or_default();
        prop_assert!(mirrors(&state, &next.desired_meta), "{:?} vs {:?}", state, next.desired_meta);
    }
}

fn mirrors(state: &Object, meta: &MetaMap) -> bool {
    state.len() == meta.len()
        && state.iter().all(|(k, v)| match (v, meta.get(k)) {
            (Value::Object(inner), Some(Meta::Node(m))) => mirrors(inner, m),
            (Value::Object(_), _) => false,
            (_, Some(Meta::Leaf(_))) => true,
            _ => false,
        })
}

#[test]
fn metadata_reads_back_as_written_and_refuses_what_is_not_metadata() {
    let d = doc(
        json!({"a": {"timestamp": 5, "b": [1]}, "c": "x", "e": {}}),
        json!({}),
    );
    let text = serde_json::to_string(&d.desired_meta).unwrap();
    assert_eq!(
        text,
        r#"{"a":{"b":{"timestamp":100},"timestamp":{"timestamp":100}},"c":{"timestamp":100},"e":{}}"#
    );
    assert_eq!(serde_json::from_str::<MetaMap>(&text).unwrap(), d.desired_meta);
    for bad in [
        r#"{"a":1}"#,
        r#"{"a":{"timestamp":1,"b":{"timestamp":2}}}"#,
        r#"{"a":"x"}"#,
        "[]",
    ] {
        assert!(serde_json::from_str::<MetaMap>(bad).is_err(), "{bad}");
    }
}
