//! OTA types: what operators send and what the platform stores and answers.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// A firmware image in the catalogue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"id": "fw_6c1f0a2b9d3e", "version": "2.1.0", "models": ["esl-2.9"], "url": "https://firmware.example/esl-2.1.0.bin",
    "sha256": "9c1e0b4f6a3d2e8b7c5a4f1e0d9c8b7a6f5e4d3c2b1a09f8e7d6c5b4a3f2e1d0", "size": 524288, "release_notes": "Faster refresh", "created_at": "2026-11-22T10:00:00Z"}))]
pub struct Firmware {
    /// Identifier.
    pub id: String,
    /// Semantic version.
    pub version: String,
    /// Hardware models it runs on (a device's `attributes.model`).
    pub models: Vec<String>,
    /// Download URL (http or https).
    pub url: String,
    /// SHA-256 of the image, lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Optional signature over the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Release notes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_notes: Option<String>,
    /// When it was published.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
}

/// A firmware image to publish.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"version": "2.1.0", "models": ["esl-2.9"], "url": "https://firmware.example/esl-2.1.0.bin",
    "sha256": "9c1e0b4f6a3d2e8b7c5a4f1e0d9c8b7a6f5e4d3c2b1a09f8e7d6c5b4a3f2e1d0", "size": 524288, "release_notes": "Faster refresh"}))]
pub struct NewFirmware {
    /// Semantic version (`MAJOR.MINOR.PATCH[-pre][+build]`).
    pub version: String,
    /// Hardware models, at least one.
    pub models: Vec<String>,
    /// Download URL (http or https, at most 2048 characters).
    pub url: String,
    /// SHA-256 of the image, 64 hex characters.
    pub sha256: String,
    /// Size in bytes, more than 0.
    pub size: u64,
    /// Optional signature (at most 4096 characters).
    pub signature: Option<String>,
    /// Release notes (at most 16 KiB).
    pub release_notes: Option<String>,
}

/// Which devices a deployment targets; evaluated once, when it starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct Target {
    /// Exactly these devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_ids: Option<Vec<String>>,
    /// Every device with this tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Every device whose attributes contain all of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub attributes: Option<Map<String, Value>>,
}

/// What happens when too many devices fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdAction {
    /// Stop starting new waves until an operator resumes.
    Pause,
    /// Stop for good; queued jobs are canceled.
    Abort,
}

/// Failure threshold: a percent of the deployment's devices, or a count, that fail (FAILED or TIMED_OUT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailureThreshold {
    /// Trip when more than this percent of all targeted devices failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// Trip when at least this many devices failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Pause or abort.
    pub action: ThresholdAction,
}

/// How a deployment rolls out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Waves as cumulative percentages of the targets, e.g. `[10, 50, 100]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave_percentages: Option<Vec<f64>>,
    /// Or waves of this many devices each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave_size: Option<u32>,
    /// Minimum seconds after the end of each wave before the next starts (after the last: before the deployment
    /// completes; rollbacks found meanwhile still fail their jobs).
    #[serde(default)]
    pub min_wait_secs: u64,
    /// Failure threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<FailureThreshold>,
    /// A device that has not finished this many seconds after its job was queued times out.
    #[serde(default = "default_timeout")]
    pub device_timeout_secs: u64,
}

fn default_timeout() -> u64 {
    3600
}

/// A deployment to start.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"firmware_id": "fw_6c1f0a2b9d3e", "target": {"tag": "berlin"},
    "policy": {"wave_percentages": [10, 50, 100], "min_wait_secs": 600, "failure_threshold": {"percent": 5, "action": "pause"}, "device_timeout_secs": 1800},
    "allow_downgrade": false}))]
pub struct NewDeployment {
    /// The firmware to install.
    pub firmware_id: String,
    /// Which devices.
    pub target: Target,
    /// How.
    pub policy: Policy,
    /// Allow installing a lower version than a device runs.
    #[serde(default)]
    pub allow_downgrade: bool,
}

/// Counts of jobs per state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct Counts {
    /// Waiting for the device.
    pub queued: u32,
    /// Being installed.
    pub in_progress: u32,
    /// Done.
    pub succeeded: u32,
    /// Failed (including rollbacks).
    pub failed: u32,
    /// Refused by the device or by the platform.
    pub rejected: u32,
    /// Timed out.
    pub timed_out: u32,
    /// Canceled.
    pub canceled: u32,
}

/// One wave of a deployment.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct WaveSummary {
    /// 1-based wave number.
    pub wave: u32,
    /// Devices in the wave.
    pub devices: u32,
    /// Whether the wave has started.
    pub started: bool,
    /// Jobs per state.
    pub counts: Counts,
}

/// A deployment and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Deployment {
    /// Identifier.
    pub id: String,
    /// The firmware.
    pub firmware_id: String,
    /// The target as requested.
    pub target: Target,
    /// The policy as requested.
    pub policy: Policy,
    /// Whether downgrades are allowed.
    pub allow_downgrade: bool,
    /// `running`, `paused`, `completed`, `aborted` or `canceled`.
    pub status: String,
    /// Why it paused, aborted or was canceled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// Devices targeted.
    pub devices: u32,
    /// Jobs per state, all waves.
    pub counts: Counts,
    /// Per wave.
    pub waves: Vec<WaveSummary>,
    /// Created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: time::OffsetDateTime,
}

/// One state change of a job.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Transition {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: time::OffsetDateTime,
    /// New state.
    pub status: String,
    /// Step, when in progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Percent, when in progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
    /// Why (failures, rejections, timeouts, cancellations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A device's job in a deployment.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Job {
    /// Identifier.
    pub id: String,
    /// Deployment.
    pub deployment_id: String,
    /// Device.
    pub device_id: String,
    /// 1-based wave.
    pub wave: u32,
    /// `QUEUED`, `IN_PROGRESS`, `SUCCEEDED`, `FAILED`, `REJECTED`, `TIMED_OUT`, `CANCELED`.
    pub status: String,
    /// `DOWNLOADING` or `INSTALLING` while in progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Percent done while in progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
    /// Why it failed, was rejected, timed out or was canceled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Every state change, oldest first.
    pub transitions: Vec<Transition>,
}
