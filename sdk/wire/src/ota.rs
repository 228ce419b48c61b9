//! OTA firmware jobs on the wire, shared by the platform and the SDK.
//!
//! Topics (device `{id}`):
//! - `devices/{id}/ota/job` (platform → device): the device's current job, [`JobDocument`]. Sent when a job is
//!   queued, again whenever the device subscribes (so a device that was offline gets it on reconnect), and when
//!   a job is canceled (`status: CANCELED`).
//! - `devices/{id}/ota/update` (device → platform): progress and outcome, [`JobUpdate`].
//! - `devices/{id}/ota/update/accepted` and `…/rejected` (platform → device): the job as it now is, or
//!   `{"code", "message", "jobId"}`.
//!
//! The device reports the firmware it runs in its shadow, `state.reported.firmware.version`. That report is the
//! truth: a job succeeds only when the device runs the new version, and a device that later reports another
//! version (a rollback) turns its job into `FAILED`.

use serde::{Deserialize, Serialize};

use crate::DeviceId;

/// Where the platform sends a device its job.
pub fn job_topic(id: &DeviceId) -> String {
    format!("devices/{id}/ota/job")
}

/// Where a device reports progress and outcome.
pub fn update_topic(id: &DeviceId) -> String {
    format!("devices/{id}/ota/update")
}

/// State of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// Waiting for the device.
    Queued,
    /// The device is working on it (see [`JobStep`]).
    InProgress,
    /// The device runs the new firmware.
    Succeeded,
    /// The device failed, or runs another version than the one it was given.
    Failed,
    /// The device refused the job (or the platform refused the device: incompatible, downgrade).
    Rejected,
    /// The device did not finish within the deployment's per-device timeout.
    TimedOut,
    /// The deployment was canceled or aborted.
    Canceled,
}

impl JobStatus {
    /// Whether the job is over.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Queued | Self::InProgress)
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::InProgress => "IN_PROGRESS",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Rejected => "REJECTED",
            Self::TimedOut => "TIMED_OUT",
            Self::Canceled => "CANCELED",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::InProgress,
            Self::Succeeded,
            Self::Failed,
            Self::Rejected,
            Self::TimedOut,
            Self::Canceled,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// What a device in progress is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStep {
    /// Fetching the image.
    Downloading,
    /// Writing and activating it.
    Installing,
}

/// The firmware a job installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareRef {
    /// Semantic version.
    pub version: String,
    /// Where to download it.
    pub url: String,
    /// SHA-256 of the image, lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Optional signature over the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// A job as the platform sends it to the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobDocument {
    /// The job.
    pub job_id: String,
    /// Its deployment.
    pub deployment_id: String,
    /// Current state.
    pub status: JobStatus,
    /// The firmware to install.
    pub firmware: FirmwareRef,
}

/// A progress or outcome report from the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobUpdate {
    /// The job.
    pub job_id: String,
    /// `IN_PROGRESS`, `SUCCEEDED`, `FAILED` or `REJECTED`.
    pub status: JobStatus,
    /// With `IN_PROGRESS`: what the device is doing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<JobStep>,
    /// With `IN_PROGRESS`: percent done, 0–100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
    /// With `FAILED`/`REJECTED`: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_in_the_documented_shape() {
        let update = JobUpdate {
            job_id: "job_1".into(),
            status: JobStatus::InProgress,
            step: Some(JobStep::Downloading),
            progress: Some(40),
            reason: None,
        };
        let json = serde_json::to_value(&update).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"jobId": "job_1", "status": "IN_PROGRESS", "step": "DOWNLOADING", "progress": 40})
        );
        assert_eq!(serde_json::from_value::<JobUpdate>(json).unwrap(), update);
        assert!(serde_json::from_str::<JobUpdate>(r#"{"jobId":"j","status":"DONE"}"#).is_err());
        assert!(JobStatus::TimedOut.is_terminal() && !JobStatus::Queued.is_terminal());
        assert_eq!(JobStatus::parse("TIMED_OUT"), Some(JobStatus::TimedOut));
    }
}
