//! MQTT topic names. A device may publish and subscribe only under [`device_prefix`].
//!
//! Shadow topics follow AWS IoT's layout under the device's own prefix:
//! `devices/{id}/shadow/{update|get|delete}` for requests and `…/accepted`, `…/rejected`, `update/delta`,
//! `update/documents` for replies; named shadows insert `name/{name}` after `shadow`.

use crate::DeviceId;

/// The topic prefix every topic of a device starts with: `devices/{id}/`.
pub fn device_prefix(id: &DeviceId) -> String {
    format!("devices/{id}/")
}

/// The device id level of a topic under `devices/{id}/`, unchecked; `None` for any other topic.
pub fn device_of(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix("devices/")?;
    rest.split_once('/').map(|(id, _)| id)
}

/// Topic on which a device publishes classic shadow updates.
pub fn shadow_update(id: &DeviceId) -> String {
    shadow_topic(id, None, "update")
}

/// Topic on which the platform publishes the classic shadow's delta between desired and reported state.
pub fn shadow_delta(id: &DeviceId) -> String {
    shadow_topic(id, None, "update/delta")
}

/// `devices/{id}/shadow[/name/{name}]/{suffix}`.
pub fn shadow_topic(id: &DeviceId, name: Option<&str>, suffix: &str) -> String {
    match name {
        Some(name) => format!("devices/{id}/shadow/name/{name}/{suffix}"),
        None => format!("devices/{id}/shadow/{suffix}"),
    }
}

/// A shadow request a device can publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowOp {
    /// `…/update`
    Update,
    /// `…/get`
    Get,
    /// `…/delete`
    Delete,
}

impl ShadowOp {
    /// The topic level of this request.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Update => "update",
            Self::Get => "get",
            Self::Delete => "delete",
        }
    }
}

/// A parsed shadow request topic: the shadow's name (`None` for the classic shadow) and the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowRequestTopic<'a> {
    /// Named shadow, if any (not yet validated).
    pub name: Option<&'a str>,
    /// The request.
    pub op: ShadowOp,
}

/// Parses `devices/{id}/shadow/{op}` or `devices/{id}/shadow/name/{name}/{op}` for the given device.
pub fn parse_shadow_request<'a>(id: &DeviceId, topic: &'a str) -> Option<ShadowRequestTopic<'a>> {
    let rest = topic
        .strip_prefix("devices/")?
        .strip_prefix(id.as_str())?
        .strip_prefix("/shadow/")?;
    let (name, op) = match rest.strip_prefix("name/") {
        Some(named) => {
            let (name, op) = named.split_once('/')?;
            (Some(name), op)
        }
        None => (None, rest),
    };
    let op = match op {
        "update" => ShadowOp::Update,
        "get" => ShadowOp::Get,
        "delete" => ShadowOp::Delete,
        _ => return None,
    };
    Some(ShadowRequestTopic { name, op })
}

/// Parses a reply topic the platform publishes for `id`: the shadow's name (`None` for the classic shadow)
/// and the suffix after it (`update/accepted`, `update/delta`, `get/rejected`, …).
pub fn parse_shadow_reply<'a>(id: &DeviceId, topic: &'a str) -> Option<(Option<&'a str>, &'a str)> {
    let rest = topic
        .strip_prefix("devices/")?
        .strip_prefix(id.as_str())?
        .strip_prefix("/shadow/")?;
    let (name, suffix) = match rest.strip_prefix("name/") {
        Some(named) => {
            let (name, suffix) = named.split_once('/')?;
            (Some(name), suffix)
        }
        None => (None, rest),
    };
    suffix.contains('/').then_some((name, suffix))
}

/// The filters of a device's shadow replies, classic and named: `accepted` and `rejected` of every operation
/// and `update/delta`, as AWS IoT's device SDKs subscribe. Not `…/shadow/#`: that also brings back each of the
/// device's own requests and the `documents` message of every update (both versions of the document, the
/// largest message there is), which a device does not read.
pub fn shadow_filters(id: &DeviceId) -> [String; 6] {
    [
        format!("devices/{id}/shadow/+/accepted"),
        format!("devices/{id}/shadow/+/rejected"),
        format!("devices/{id}/shadow/update/delta"),
        format!("devices/{id}/shadow/name/+/+/accepted"),
        format!("devices/{id}/shadow/name/+/+/rejected"),
        format!("devices/{id}/shadow/name/+/update/delta"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_sit_under_the_device_prefix() {
        let id = DeviceId::parse("lamp-1").unwrap();
        assert_eq!(device_prefix(&id), "devices/lamp-1/");
        assert!(shadow_update(&id).starts_with(&device_prefix(&id)));
        assert_eq!(shadow_delta(&id), "devices/lamp-1/shadow/update/delta");
        assert_eq!(
            shadow_topic(&id, Some("cfg"), "get/accepted"),
            "devices/lamp-1/shadow/name/cfg/get/accepted"
        );
    }

    /// MQTT filter matching, enough for the filters above (`+` only).
    fn covers(filter: &str, topic: &str) -> bool {
        let (f, t): (Vec<_>, Vec<_>) = (filter.split('/').collect(), topic.split('/').collect());
        f.len() == t.len() && f.iter().zip(&t).all(|(f, t)| *f == "+" || f == t)
    }

    #[test]
    fn the_shadow_filters_cover_each_reply_once_and_no_request_or_documents() {
        let id = DeviceId::parse("lamp-1").unwrap();
        let filters = shadow_filters(&id);
        for shadow in ["devices/lamp-1/shadow", "devices/lamp-1/shadow/name/cfg"] {
            for op in ["update", "get", "delete"] {
                for reply in ["accepted", "rejected"] {
                    let topic = format!("{shadow}/{op}/{reply}");
                    assert_eq!(filters.iter().filter(|f| covers(f, &topic)).count(), 1, "{topic}");
                }
                let request = format!("{shadow}/{op}");
                assert!(!filters.iter().any(|f| covers(f, &request)), "{request}");
            }
            let delta = format!("{shadow}/update/delta");
            assert_eq!(filters.iter().filter(|f| covers(f, &delta)).count(), 1, "{delta}");
            let documents = format!("{shadow}/update/documents");
            assert!(!filters.iter().any(|f| covers(f, &documents)), "{documents}");
        }
        assert!(!filters
            .iter()
            .any(|f| covers(f, "devices/lamp-2/shadow/update/accepted")));
    }

    #[test]
    fn replies_parse() {
        let id = DeviceId::parse("lamp-1").unwrap();
        assert_eq!(
            parse_shadow_reply(&id, "devices/lamp-1/shadow/update/delta"),
            Some((None, "update/delta"))
        );
        assert_eq!(
            parse_shadow_reply(&id, "devices/lamp-1/shadow/name/cfg/get/accepted"),
            Some((Some("cfg"), "get/accepted"))
        );
        assert_eq!(parse_shadow_reply(&id, "devices/lamp-1/shadow/update"), None);
        assert_eq!(
            parse_shadow_reply(&id, "devices/lamp-2/shadow/update/delta"),
            None
        );
    }

    #[test]
    fn requests_parse_and_replies_do_not() {
        let id = DeviceId::parse("lamp-1").unwrap();
        let p = |t| parse_shadow_request(&id, t);
        assert_eq!(
            p("devices/lamp-1/shadow/update"),
            Some(ShadowRequestTopic {
                name: None,
                op: ShadowOp::Update
            })
        );
        assert_eq!(
            p("devices/lamp-1/shadow/get"),
            Some(ShadowRequestTopic {
                name: None,
                op: ShadowOp::Get
            })
        );
        assert_eq!(
            p("devices/lamp-1/shadow/name/cfg/delete"),
            Some(ShadowRequestTopic {
                name: Some("cfg"),
                op: ShadowOp::Delete
            })
        );
        for t in [
            "devices/lamp-1/shadow/update/accepted",
            "devices/lamp-1/shadow/update/delta",
            "devices/lamp-1/shadow/name/cfg",
            "devices/lamp-2/shadow/update",
            "devices/lamp-1/telemetry",
        ] {
            assert_eq!(p(t), None, "{t}");
        }
    }
}
