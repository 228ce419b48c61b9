//! MQTT topic names. A device may publish and subscribe only under [`device_prefix`].

use crate::DeviceId;

/// The topic prefix every topic of a device starts with: `devices/{id}/`.
pub fn device_prefix(id: &DeviceId) -> String {
    format!("devices/{id}/")
}

/// Topic on which a device publishes shadow updates.
pub fn shadow_update(id: &DeviceId) -> String {
    format!("devices/{id}/shadow/update")
}

/// Topic on which the platform publishes the delta between desired and reported state.
pub fn shadow_delta(id: &DeviceId) -> String {
    format!("devices/{id}/shadow/update/delta")
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
    }
}
