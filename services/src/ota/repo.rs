//! SQL for the OTA service (same portable dialect as the registry: `$n`, TEXT, BIGINT).

use antumbra_wire::ota::JobStatus;
use sqlx::any::AnyRow;
use sqlx::Row;
use time::OffsetDateTime;

use super::model::{
    Counts, Deployment, Firmware, Job, NewDeployment, Policy, Target, Transition, WaveSummary,
};
use crate::registry::{from_millis, to_millis, Registry, RegistryError, Tx};

fn json_of<T: serde::de::DeserializeOwned>(row: &AnyRow, column: &str) -> Result<T, RegistryError> {
    let text: String = row.try_get(column)?;
    serde_json::from_str(&text).map_err(|e| RegistryError::Corrupt(format!("{column}: {e}")))
}

fn firmware_from(row: &AnyRow) -> Result<Firmware, RegistryError> {
    Ok(Firmware {
        id: row.try_get("id")?,
        version: row.try_get("version")?,
        models: json_of(row, "models")?,
        url: row.try_get("url")?,
        sha256: row.try_get("sha256")?,
        size: row.try_get::<i64, _>("size")? as u64,
        signature: row.try_get("signature")?,
        release_notes: row.try_get("release_notes")?,
        created_at: from_millis(row.try_get("created_at")?)?,
    })
}

const FIRMWARE: &str = "id, version, models, url, sha256, size, signature, release_notes, created_at";

pub(super) async fn insert_firmware(reg: &Registry, f: &Firmware) -> Result<(), RegistryError> {
    let mut tx = reg.begin().await?;
    sqlx::query(&format!(
        "INSERT INTO firmware ({FIRMWARE}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    ))
    .bind(f.id.clone())
    .bind(f.version.clone())
    .bind(serde_json::to_string(&f.models).unwrap_or_default())
    .bind(f.url.clone())
    .bind(f.sha256.clone())
    .bind(f.size as i64)
    .bind(f.signature.clone())
    .bind(f.release_notes.clone())
    .bind(to_millis(f.created_at))
    .execute(&mut *tx)
    .await?;
    for model in &f.models {
        sqlx::query("INSERT INTO firmware_models (firmware_id, model, version) VALUES ($1, $2, $3)")
            .bind(f.id.clone())
            .bind(model.clone())
            .bind(f.version.clone())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn firmware_list(
    reg: &Registry,
    model: Option<&str>,
) -> Result<Vec<Firmware>, RegistryError> {
    let rows = sqlx::query(&format!(
        "SELECT {FIRMWARE} FROM firmware f WHERE $1 IS NULL OR EXISTS \
         (SELECT 1 FROM firmware_models m WHERE m.firmware_id = f.id AND m.model = $1) ORDER BY created_at DESC, id"
    ))
    .bind(model.map(str::to_owned))
    .fetch_all(reg.pool())
    .await?;
    rows.iter().map(firmware_from).collect()
}

pub(super) async fn firmware(reg: &Registry, id: &str) -> Result<Option<Firmware>, RegistryError> {
    let row = sqlx::query(&format!("SELECT {FIRMWARE} FROM firmware WHERE id = $1"))
        .bind(id.to_owned())
        .fetch_optional(reg.pool())
        .await?;
    row.as_ref().map(firmware_from).transpose()
}

pub(super) async fn firmware_in_use(reg: &Registry, id: &str) -> Result<bool, RegistryError> {
    let row = sqlx::query("SELECT 1 FROM deployments WHERE firmware_id = $1")
        .bind(id.to_owned())
        .fetch_optional(reg.pool())
        .await?;
    Ok(row.is_some())
}

pub(super) async fn delete_firmware(reg: &Registry, id: &str) -> Result<(), RegistryError> {
    let mut tx = reg.begin().await?;
    sqlx::query("DELETE FROM firmware_models WHERE firmware_id = $1")
        .bind(id.to_owned())
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM firmware WHERE id = $1")
        .bind(id.to_owned())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn insert_deployment(
    tx: &mut Tx,
    id: &str,
    new: &NewDeployment,
    devices: &[String],
    waves: &[u32],
    now: OffsetDateTime,
) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO deployments (id, firmware_id, target, policy, devices, waves, allow_downgrade, status, status_reason, \
         current_wave, wave_done_at, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 'running', NULL, 0, NULL, $8, $8)",
    )
    .bind(id.to_owned())
    .bind(new.firmware_id.clone())
    .bind(serde_json::to_string(&new.target).unwrap_or_default())
    .bind(serde_json::to_string(&new.policy).unwrap_or_default())
    .bind(serde_json::to_string(devices).unwrap_or_default())
    .bind(serde_json::to_string(waves).unwrap_or_default())
    .bind(i64::from(new.allow_downgrade))
    .bind(to_millis(now))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A deployment as the engine needs it.
pub(super) struct DeploymentRow {
    pub id: String,
    pub firmware_id: String,
    pub target: Target,
    pub policy: Policy,
    pub devices: Vec<String>,
    pub waves: Vec<u32>,
    pub allow_downgrade: bool,
    pub status: String,
    pub status_reason: Option<String>,
    pub current_wave: u32,
    pub wave_done_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

const DEPLOYMENT: &str =
    "id, firmware_id, target, policy, devices, waves, allow_downgrade, status, status_reason, \
                          current_wave, wave_done_at, created_at, updated_at";

fn deployment_from(row: &AnyRow) -> Result<DeploymentRow, RegistryError> {
    Ok(DeploymentRow {
        id: row.try_get("id")?,
        firmware_id: row.try_get("firmware_id")?,
        target: json_of(row, "target")?,
        policy: json_of(row, "policy")?,
        devices: json_of(row, "devices")?,
        waves: json_of(row, "waves")?,
        allow_downgrade: row.try_get::<i64, _>("allow_downgrade")? != 0,
        status: row.try_get("status")?,
        status_reason: row.try_get("status_reason")?,
        current_wave: row.try_get::<i64, _>("current_wave")? as u32,
        wave_done_at: row
            .try_get::<Option<i64>, _>("wave_done_at")?
            .map(from_millis)
            .transpose()?,
        created_at: from_millis(row.try_get("created_at")?)?,
        updated_at: from_millis(row.try_get("updated_at")?)?,
    })
}

pub(super) async fn deployment_row(reg: &Registry, id: &str) -> Result<Option<DeploymentRow>, RegistryError> {
    let row = sqlx::query(&format!("SELECT {DEPLOYMENT} FROM deployments WHERE id = $1"))
        .bind(id.to_owned())
        .fetch_optional(reg.pool())
        .await?;
    row.as_ref().map(deployment_from).transpose()
}

pub(super) async fn active_deployments(reg: &Registry) -> Result<Vec<DeploymentRow>, RegistryError> {
    let rows = sqlx::query(&format!(
        "SELECT {DEPLOYMENT} FROM deployments WHERE status IN ('running', 'paused') ORDER BY created_at"
    ))
    .fetch_all(reg.pool())
    .await?;
    rows.iter().map(deployment_from).collect()
}

/// Makes `wave` the current one, never an earlier wave than the current one (two instances may start the same
/// wave).
pub(super) async fn set_wave(
    tx: &mut Tx,
    id: &str,
    wave: u32,
    now: OffsetDateTime,
) -> Result<(), RegistryError> {
    sqlx::query(
        "UPDATE deployments SET current_wave = $2, wave_done_at = NULL, updated_at = $3 \
         WHERE id = $1 AND current_wave <= $2",
    )
    .bind(id.to_owned())
    .bind(i64::from(wave))
    .bind(to_millis(now))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub(super) async fn set_wave_done(
    reg: &Registry,
    id: &str,
    now: OffsetDateTime,
) -> Result<(), RegistryError> {
    sqlx::query("UPDATE deployments SET wave_done_at = $2, updated_at = $2 WHERE id = $1")
        .bind(id.to_owned())
        .bind(to_millis(now))
        .execute(reg.pool())
        .await?;
    Ok(())
}

pub(super) async fn set_status(
    reg: &Registry,
    id: &str,
    status: &str,
    reason: Option<&str>,
    now: OffsetDateTime,
) -> Result<(), RegistryError> {
    sqlx::query("UPDATE deployments SET status = $2, status_reason = $3, updated_at = $4 WHERE id = $1")
        .bind(id.to_owned())
        .bind(status.to_owned())
        .bind(reason.map(str::to_owned))
        .bind(to_millis(now))
        .execute(reg.pool())
        .await?;
    Ok(())
}

/// A job as the engine needs it.
pub(super) struct JobRow {
    pub id: String,
    pub deployment_id: String,
    pub device_id: String,
    pub wave: u32,
    pub status: JobStatus,
    pub queued_at: OffsetDateTime,
}

const JOB: &str = "id, deployment_id, device_id, wave, status, step, progress, reason, queued_at, updated_at";

fn status_of(row: &AnyRow) -> Result<JobStatus, RegistryError> {
    let text: String = row.try_get("status")?;
    JobStatus::parse(&text).ok_or_else(|| RegistryError::Corrupt(format!("job status {text:?}")))
}

fn job_row(row: &AnyRow) -> Result<JobRow, RegistryError> {
    Ok(JobRow {
        id: row.try_get("id")?,
        deployment_id: row.try_get("deployment_id")?,
        device_id: row.try_get("device_id")?,
        wave: row.try_get::<i64, _>("wave")? as u32,
        status: status_of(row)?,
        queued_at: from_millis(row.try_get("queued_at")?)?,
    })
}

/// A job a deployment is about to write: queued, or refused with a reason.
pub(super) struct NewJob {
    pub id: String,
    pub device: String,
    pub wave: u32,
    pub status: JobStatus,
    pub reason: Option<String>,
}

/// Writes `job` of `deployment` and its first transition, inside the caller's transaction.
pub(super) async fn insert_job(
    tx: &mut Tx,
    deployment: &str,
    job: &NewJob,
    now: OffsetDateTime,
) -> Result<(), RegistryError> {
    sqlx::query(&format!(
        "INSERT INTO jobs ({JOB}) VALUES ($1, $2, $3, $4, $5, NULL, NULL, $6, $7, $7)"
    ))
    .bind(job.id.clone())
    .bind(deployment.to_owned())
    .bind(job.device.clone())
    .bind(i64::from(job.wave))
    .bind(job.status.as_str())
    .bind(job.reason.clone())
    .bind(to_millis(now))
    .execute(&mut **tx)
    .await?;
    sqlx::query("INSERT INTO job_transitions (job_id, at, status, step, progress, reason) VALUES ($1, $2, $3, NULL, NULL, $4)")
        .bind(job.id.clone())
        .bind(to_millis(now))
        .bind(job.status.as_str())
        .bind(job.reason.clone())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Moves a job to `status` and records the transition, in one transaction.
pub(super) async fn transition(
    reg: &Registry,
    id: &str,
    status: JobStatus,
    step: Option<&str>,
    progress: Option<u8>,
    reason: Option<&str>,
    now: OffsetDateTime,
) -> Result<(), RegistryError> {
    let mut tx = reg.begin().await?;
    sqlx::query(
        "UPDATE jobs SET status = $2, step = $3, progress = $4, reason = $5, updated_at = $6 WHERE id = $1",
    )
    .bind(id.to_owned())
    .bind(status.as_str())
    .bind(step.map(str::to_owned))
    .bind(progress.map(i64::from))
    .bind(reason.map(str::to_owned))
    .bind(to_millis(now))
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO job_transitions (job_id, at, status, step, progress, reason) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(id.to_owned())
        .bind(to_millis(now))
        .bind(status.as_str())
        .bind(step.map(str::to_owned))
        .bind(progress.map(i64::from))
        .bind(reason.map(str::to_owned))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn jobs_of(reg: &Registry, deployment: &str) -> Result<Vec<JobRow>, RegistryError> {
    let rows = sqlx::query(&format!(
        "SELECT {JOB} FROM jobs WHERE deployment_id = $1 ORDER BY wave, device_id"
    ))
    .bind(deployment.to_owned())
    .fetch_all(reg.pool())
    .await?;
    rows.iter().map(job_row).collect()
}

pub(super) async fn job(reg: &Registry, id: &str) -> Result<Option<JobRow>, RegistryError> {
    let row = sqlx::query(&format!("SELECT {JOB} FROM jobs WHERE id = $1"))
        .bind(id.to_owned())
        .fetch_optional(reg.pool())
        .await?;
    row.as_ref().map(job_row).transpose()
}

pub(super) async fn active_job_of(reg: &Registry, device: &str) -> Result<Option<JobRow>, RegistryError> {
    let row = sqlx::query(&format!(
        "SELECT {JOB} FROM jobs WHERE device_id = $1 AND status IN ('QUEUED', 'IN_PROGRESS') ORDER BY queued_at DESC LIMIT 1"
    ))
    .bind(device.to_owned())
    .fetch_optional(reg.pool())
    .await?;
    row.as_ref().map(job_row).transpose()
}

/// Succeeded jobs of a device in deployments still running or paused, with their firmware version.
pub(super) async fn succeeded_active_jobs_of(
    reg: &Registry,
    device: &str,
) -> Result<Vec<(String, String)>, RegistryError> {
    let rows = sqlx::query(
        "SELECT j.id, f.version FROM jobs j JOIN deployments d ON d.id = j.deployment_id JOIN firmware f ON f.id = d.firmware_id \
         WHERE j.device_id = $1 AND j.status = 'SUCCEEDED' AND d.status IN ('running', 'paused')",
    )
    .bind(device.to_owned())
    .fetch_all(reg.pool())
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get("version")?)))
        .collect()
}

fn job_from(row: &AnyRow, transitions: Vec<Transition>) -> Result<Job, RegistryError> {
    let r = job_row(row)?;
    Ok(Job {
        id: r.id,
        deployment_id: r.deployment_id,
        device_id: r.device_id,
        wave: r.wave + 1,
        status: r.status.as_str().to_owned(),
        step: row.try_get("step")?,
        progress: row
            .try_get::<Option<i64>, _>("progress")?
            .map(|p| p.clamp(0, 100) as u8),
        reason: row.try_get("reason")?,
        transitions,
    })
}

async fn transitions_of(reg: &Registry, job: &str) -> Result<Vec<Transition>, RegistryError> {
    let rows = sqlx::query(
        "SELECT at, status, step, progress, reason FROM job_transitions WHERE job_id = $1 ORDER BY at",
    )
    .bind(job.to_owned())
    .fetch_all(reg.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Transition {
                at: from_millis(r.try_get("at")?)?,
                status: r.try_get("status")?,
                step: r.try_get("step")?,
                progress: r
                    .try_get::<Option<i64>, _>("progress")?
                    .map(|p| p.clamp(0, 100) as u8),
                reason: r.try_get("reason")?,
            })
        })
        .collect()
}

pub(super) async fn job_detail(reg: &Registry, id: &str) -> Result<Option<Job>, RegistryError> {
    let row = sqlx::query(&format!("SELECT {JOB} FROM jobs WHERE id = $1"))
        .bind(id.to_owned())
        .fetch_optional(reg.pool())
        .await?;
    match row {
        Some(row) => Ok(Some(job_from(&row, transitions_of(reg, id).await?)?)),
        None => Ok(None),
    }
}

pub(super) async fn jobs_with_transitions(
    reg: &Registry,
    deployment: &str,
) -> Result<Vec<Job>, RegistryError> {
    let rows = sqlx::query(&format!(
        "SELECT {JOB} FROM jobs WHERE deployment_id = $1 ORDER BY wave, device_id"
    ))
    .bind(deployment.to_owned())
    .fetch_all(reg.pool())
    .await?;
    let mut jobs = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: String = row.try_get("id")?;
        jobs.push(job_from(row, transitions_of(reg, &id).await?)?);
    }
    Ok(jobs)
}

fn count(counts: &mut Counts, status: JobStatus) {
    match status {
        JobStatus::Queued => counts.queued += 1,
        JobStatus::InProgress => counts.in_progress += 1,
        JobStatus::Succeeded => counts.succeeded += 1,
        JobStatus::Failed => counts.failed += 1,
        JobStatus::Rejected => counts.rejected += 1,
        JobStatus::TimedOut => counts.timed_out += 1,
        JobStatus::Canceled => counts.canceled += 1,
    }
}

async fn summarize(reg: &Registry, row: DeploymentRow) -> Result<Deployment, RegistryError> {
    let jobs = jobs_of(reg, &row.id).await?;
    let mut total = Counts::default();
    let mut waves: Vec<WaveSummary> = row
        .waves
        .iter()
        .enumerate()
        .map(|(i, size)| WaveSummary {
            wave: i as u32 + 1,
            devices: *size,
            started: i as u32 <= row.current_wave,
            counts: Counts::default(),
        })
        .collect();
    for job in &jobs {
        count(&mut total, job.status);
        if let Some(wave) = waves.get_mut(job.wave as usize) {
            count(&mut wave.counts, job.status);
        }
    }
    Ok(Deployment {
        id: row.id,
        firmware_id: row.firmware_id,
        target: row.target,
        policy: row.policy,
        allow_downgrade: row.allow_downgrade,
        status: row.status,
        status_reason: row.status_reason,
        devices: row.devices.len() as u32,
        counts: total,
        waves,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

pub(super) async fn deployment(reg: &Registry, id: &str) -> Result<Option<Deployment>, RegistryError> {
    match deployment_row(reg, id).await? {
        Some(row) => Ok(Some(summarize(reg, row).await?)),
        None => Ok(None),
    }
}

pub(super) async fn deployments(reg: &Registry) -> Result<Vec<Deployment>, RegistryError> {
    let rows = sqlx::query(&format!(
        "SELECT {DEPLOYMENT} FROM deployments ORDER BY created_at DESC, id"
    ))
    .fetch_all(reg.pool())
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        out.push(summarize(reg, deployment_from(row)?).await?);
    }
    Ok(out)
}
