//! Per-device topic isolation: a device may publish and subscribe only under `devices/{its id}/`.
//!
//! Pure functions, so the rules are tested exhaustively without a socket. A topic or filter is allowed only
//! when it is valid MQTT, does not start with `$`, and its first two levels are literally `devices` and the
//! device's own id — so no wildcard can reach above or beside the device's own subtree.

use antumbra_wire::DeviceId;

/// Whether `device` may publish on `topic`.
pub fn may_publish(device: &DeviceId, topic: &str) -> bool {
    !topic.contains(['+', '#', '\0']) && under_own_prefix(device, topic)
}

/// Whether `device` may subscribe to `filter`.
pub fn may_subscribe(device: &DeviceId, filter: &str) -> bool {
    if filter.contains('\0') || !rumqttd::protocol::valid_filter(filter) {
        return false;
    }
    under_own_prefix(device, filter)
}

/// `devices/{id}/` followed by at least one more level; the first two levels are literal.
fn under_own_prefix(device: &DeviceId, topic: &str) -> bool {
    let Some(rest) = topic.strip_prefix("devices/") else {
        return false;
    };
    let Some(rest) = rest.strip_prefix(device.as_str()) else {
        return false;
    };
    rest.starts_with('/') && rest.len() > 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn own_topics_are_allowed() {
        let d = id("lamp-1");
        for t in [
            "devices/lamp-1/shadow/update",
            "devices/lamp-1/x",
            "devices/lamp-1/a/b/c",
        ] {
            assert!(may_publish(&d, t), "{t}");
            assert!(may_subscribe(&d, t), "{t}");
        }
        for f in [
            "devices/lamp-1/#",
            "devices/lamp-1/+",
            "devices/lamp-1/shadow/+/accepted",
            "devices/lamp-1/+/#",
        ] {
            assert!(may_subscribe(&d, f), "{f}");
        }
    }

    #[test]
    fn other_devices_wildcards_above_the_prefix_and_system_topics_are_refused() {
        let d = id("lamp-1");
        for t in [
            "devices/lamp-2/shadow/update",
            "devices/lamp-10/x",
            "devices/lamp-/x",
            "devices/lamp-1",
            "devices/lamp-1/",
            "devices/lamp-1x/y",
            "devices",
            "x/devices/lamp-1/y",
            "$SYS/broker",
            "$share/g/devices/lamp-1/x",
            "/devices/lamp-1/x",
            "",
            "Devices/lamp-1/x",
        ] {
            assert!(!may_publish(&d, t), "publish {t:?}");
            assert!(!may_subscribe(&d, t), "subscribe {t:?}");
        }
        for f in [
            "#",
            "+/lamp-1/x",
            "devices/+/x",
            "devices/#",
            "+/+/#",
            "devices/lamp-1#",
            "devices/lamp-1/a#",
        ] {
            assert!(!may_subscribe(&d, f), "subscribe {f:?}");
        }
        for t in ["devices/lamp-1/+", "devices/lamp-1/#", "devices/lamp-1/a\0b"] {
            assert!(!may_publish(&d, t), "wildcards or NUL are not topics: {t:?}");
        }
    }

    #[test]
    fn ids_with_dots_and_colons_are_literal() {
        let d = id("a.b:c");
        assert!(may_publish(&d, "devices/a.b:c/t"));
        assert!(!may_publish(&d, "devices/a.b/t"));
    }
}
