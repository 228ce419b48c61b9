//! Devices and their tags.

use antumbra_wire::DeviceId;
use sqlx::any::AnyRow;
use sqlx::Row;
use time::OffsetDateTime;

use super::{from_millis, to_millis, Registry, RegistryError, Tx};

/// A registered device.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// Its id.
    pub id: DeviceId,
    /// Display name.
    pub name: Option<String>,
    /// Free-form attributes, a JSON object.
    pub attributes: serde_json::Map<String, serde_json::Value>,
    /// Tags, sorted.
    pub tags: Vec<String>,
    /// When it was registered.
    pub created_at: OffsetDateTime,
    /// When it was last changed.
    pub updated_at: OffsetDateTime,
}

/// A device to insert.
#[derive(Debug, Clone)]
pub struct NewDevice {
    /// Its id.
    pub id: DeviceId,
    /// Display name.
    pub name: Option<String>,
    /// Attributes.
    pub attributes: serde_json::Map<String, serde_json::Value>,
    /// Tags.
    pub tags: Vec<String>,
}

/// Changes to a device; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct DeviceChanges {
    /// New display name (`Some(None)` clears it).
    pub name: Option<Option<String>>,
    /// New attributes, replacing the old ones whole.
    pub attributes: Option<serde_json::Map<String, serde_json::Value>>,
    /// New tags, replacing the old ones whole.
    pub tags: Option<Vec<String>>,
}

/// A page request over devices, ordered by id.
#[derive(Debug, Clone)]
pub struct DeviceQuery {
    /// Only devices carrying this tag.
    pub tag: Option<String>,
    /// Only devices that are (or are not) online, per the stored presence.
    pub online: Option<bool>,
    /// Only ids after this one (the previous page's cursor).
    pub after: Option<String>,
    /// Page size.
    pub limit: u32,
}

const COLUMNS: &str = "d.id, d.name, d.attributes, d.created_at, d.updated_at";

impl Registry {
    /// Inserts a device and its tags. [`RegistryError::Conflict`] when the id is taken.
    pub async fn insert_device(
        &self,
        tx: &mut Tx,
        device: &NewDevice,
        at: OffsetDateTime,
    ) -> Result<Device, RegistryError> {
        let attributes = serde_json::Value::Object(device.attributes.clone()).to_string();
        sqlx::query(
            "INSERT INTO devices (id, name, attributes, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)",
        )
        .bind(device.id.as_str())
        .bind(device.name.clone())
        .bind(attributes)
        .bind(to_millis(at))
        .execute(&mut **tx)
        .await?;
        let tags = replace_tags(tx, &device.id, &device.tags).await?;
        Ok(Device {
            id: device.id.clone(),
            name: device.name.clone(),
            attributes: device.attributes.clone(),
            tags,
            created_at: at,
            updated_at: at,
        })
    }

    /// Whether a device exists.
    pub async fn device_exists(&self, id: &DeviceId) -> Result<bool, RegistryError> {
        let row = sqlx::query("SELECT 1 FROM devices WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(self.pool())
            .await?;
        Ok(row.is_some())
    }

    /// One device.
    pub async fn device(&self, id: &DeviceId) -> Result<Device, RegistryError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM devices d WHERE d.id = $1"))
            .bind(id.as_str())
            .fetch_optional(self.pool())
            .await?
            .ok_or(RegistryError::NotFound)?;
        let tags = tags_of(self.pool(), id).await?;
        device_from_row(&row, tags)
    }

    /// A page of devices, ordered by id; `limit + 1` rows are read so the caller knows whether more follow.
    pub async fn devices(&self, query: &DeviceQuery) -> Result<Vec<Device>, RegistryError> {
        let after = query.after.clone().unwrap_or_default();
        let limit = i64::from(query.limit) + 1;
        // One statement for every filter combination: an absent filter is bound as NULL and matches all.
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM devices d LEFT JOIN device_presence p ON p.device_id = d.id \
             WHERE d.id > $1 \
             AND ($2 IS NULL OR EXISTS (SELECT 1 FROM device_tags t WHERE t.device_id = d.id AND t.tag = $2)) \
             AND ($3 IS NULL OR COALESCE(p.online, 0) = $3) \
             ORDER BY d.id LIMIT $4"
        ))
        .bind(after)
        .bind(query.tag.clone())
        .bind(query.online.map(i64::from))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        let mut devices = rows
            .iter()
            .map(|row| device_from_row(row, Vec::new()))
            .collect::<Result<Vec<_>, _>>()?;
        // One query for the whole page's tags: the page is an id range, so read the range and keep the ids seen.
        if let (Some(first), Some(last)) = (devices.first(), devices.last()) {
            let rows = sqlx::query(
                "SELECT device_id, tag FROM device_tags WHERE device_id >= $1 AND device_id <= $2 ORDER BY tag",
            )
            .bind(first.id.as_str())
            .bind(last.id.as_str())
            .fetch_all(self.pool())
            .await?;
            let mut by_id: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
            for row in &rows {
                by_id
                    .entry(row.try_get("device_id")?)
                    .or_default()
                    .push(row.try_get("tag")?);
            }
            for device in &mut devices {
                device.tags = by_id.remove(device.id.as_str()).unwrap_or_default();
            }
        }
        Ok(devices)
    }

    /// Applies changes to a device and returns it as it now is.
    pub async fn update_device(
        &self,
        id: &DeviceId,
        changes: &DeviceChanges,
        at: OffsetDateTime,
    ) -> Result<Device, RegistryError> {
        // The transaction writes before it reads. On SQLite a transaction that reads first and then writes
        // fails at once with "database is locked" (SQLITE_BUSY_SNAPSHOT) when another connection wrote in
        // between, e.g. the presence writer; one that starts with its write waits its turn instead.
        let mut tx = self.begin().await?;
        let (set_name, name) = match &changes.name {
            Some(name) => (1_i64, name.clone()),
            None => (0, None),
        };
        let attributes = changes
            .attributes
            .as_ref()
            .map(|a| serde_json::Value::Object(a.clone()).to_string());
        let done = sqlx::query(
            "UPDATE devices SET name = CASE WHEN $2 = 1 THEN $3 ELSE name END, \
             attributes = COALESCE($4, attributes), updated_at = $5 WHERE id = $1",
        )
        .bind(id.as_str())
        .bind(set_name)
        .bind(name)
        .bind(attributes)
        .bind(to_millis(at))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(RegistryError::NotFound);
        }
        let current = sqlx::query(&format!("SELECT {COLUMNS} FROM devices d WHERE d.id = $1"))
            .bind(id.as_str())
            .fetch_one(&mut *tx)
            .await?;
        let mut device = device_from_row(&current, Vec::new())?;
        device.tags = match &changes.tags {
            Some(tags) => replace_tags(&mut tx, id, tags).await?,
            None => tags_of(&mut *tx, id).await?,
        };
        tx.commit().await?;
        Ok(device)
    }

    /// Deletes a device and its tags. Its certificates stay on record (see the schema).
    pub async fn delete_device(&self, tx: &mut Tx, id: &DeviceId) -> Result<(), RegistryError> {
        sqlx::query("DELETE FROM device_tags WHERE device_id = $1")
            .bind(id.as_str())
            .execute(&mut **tx)
            .await?;
        let done = sqlx::query("DELETE FROM devices WHERE id = $1")
            .bind(id.as_str())
            .execute(&mut **tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(RegistryError::NotFound);
        }
        Ok(())
    }
}

async fn replace_tags(tx: &mut Tx, id: &DeviceId, tags: &[String]) -> Result<Vec<String>, RegistryError> {
    sqlx::query("DELETE FROM device_tags WHERE device_id = $1")
        .bind(id.as_str())
        .execute(&mut **tx)
        .await?;
    let mut sorted = tags.to_vec();
    sorted.sort();
    sorted.dedup();
    for tag in &sorted {
        sqlx::query("INSERT INTO device_tags (device_id, tag) VALUES ($1, $2)")
            .bind(id.as_str())
            .bind(tag.clone())
            .execute(&mut **tx)
            .await?;
    }
    Ok(sorted)
}

async fn tags_of<'c>(
    db: impl sqlx::Executor<'c, Database = sqlx::Any>,
    id: &DeviceId,
) -> Result<Vec<String>, RegistryError> {
    let rows = sqlx::query("SELECT tag FROM device_tags WHERE device_id = $1 ORDER BY tag")
        .bind(id.as_str())
        .fetch_all(db)
        .await?;
    rows.iter()
        .map(|r| r.try_get::<String, _>("tag").map_err(RegistryError::from))
        .collect()
}

fn parse_id(id: String) -> Result<DeviceId, RegistryError> {
    DeviceId::parse(id).map_err(|e| RegistryError::Corrupt(e.to_string()))
}

fn device_from_row(row: &AnyRow, tags: Vec<String>) -> Result<Device, RegistryError> {
    let attributes: String = row.try_get("attributes")?;
    let attributes = match serde_json::from_str(&attributes) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => return Err(RegistryError::Corrupt(format!("attributes {attributes:?}"))),
    };
    Ok(Device {
        id: parse_id(row.try_get("id")?)?,
        name: row.try_get("name")?,
        attributes,
        tags,
        created_at: from_millis(row.try_get("created_at")?)?,
        updated_at: from_millis(row.try_get("updated_at")?)?,
    })
}
