//! Firmware updates on the device: receive jobs, report progress and outcome, report the running version.
//!
//! ```no_run
//! # async fn run(device: antumbra_sdk::Device) -> Result<(), antumbra_sdk::Error> {
//! let ota = device.ota();
//! ota.report_version("2.0.0").await?; // at start: the shadow's reported firmware version is the truth
//! let mut jobs = ota.jobs();
//! while let Some(job) = jobs.next().await {
//!     ota.progress(&job.job_id, antumbra_sdk::JobStep::Downloading, 50).await?;
//!     // … download job.firmware.url, check job.firmware.sha256, install, reboot into it …
//!     ota.report_version(&job.firmware.version).await?;
//!     ota.succeed(&job.job_id).await?;
//! }
//! # Ok(()) }
//! ```

use std::sync::Arc;

use antumbra_wire::ota::{JobDocument, JobStatus, JobStep, JobUpdate};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::client::Inner;
use crate::{Error, Shadow};

/// The OTA side of a device.
#[derive(Clone)]
pub struct Ota {
    inner: Arc<Inner>,
    shadow: Shadow,
}

impl std::fmt::Debug for Ota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ota").finish_non_exhaustive()
    }
}

/// Jobs the platform sends: each new job (and each change of its status, such as `CANCELED`) once, including
/// the open job replayed after every reconnect.
pub struct Jobs {
    rx: broadcast::Receiver<JobDocument>,
}

impl Jobs {
    /// The next job; `None` when the device is gone.
    pub async fn next(&mut self) -> Option<JobDocument> {
        loop {
            match self.rx.recv().await {
                Ok(job) => return Some(job),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Ota {
    pub(crate) fn new(inner: Arc<Inner>, shadow: Shadow) -> Self {
        Self { inner, shadow }
    }

    /// Jobs from now on (the open job, if any, arrives after the next (re)connect or right away if connected).
    pub fn jobs(&self) -> Jobs {
        Jobs {
            rx: self.inner.jobs.subscribe(),
        }
    }

    /// Reports the firmware version the device runs (`state.reported.firmware.version` in its shadow).
    pub async fn report_version(&self, version: &str) -> Result<u64, Error> {
        self.shadow
            .report(json!({ "firmware": { "version": version } }))
            .await
    }

    /// Reports progress on a job.
    pub async fn progress(&self, job_id: &str, step: JobStep, percent: u8) -> Result<Value, Error> {
        self.send(job_id, JobStatus::InProgress, Some(step), Some(percent), None)
            .await
    }

    /// Reports success. The platform accepts it only if the shadow already reports the new version
    /// ([`Ota::report_version`]); otherwise the job fails.
    pub async fn succeed(&self, job_id: &str) -> Result<Value, Error> {
        self.send(job_id, JobStatus::Succeeded, None, None, None).await
    }

    /// Reports failure, with why.
    pub async fn fail(&self, job_id: &str, reason: &str) -> Result<Value, Error> {
        self.send(job_id, JobStatus::Failed, None, None, Some(reason))
            .await
    }

    /// Refuses the job, with why.
    pub async fn reject(&self, job_id: &str, reason: &str) -> Result<Value, Error> {
        self.send(job_id, JobStatus::Rejected, None, None, Some(reason))
            .await
    }

    async fn send(
        &self,
        job_id: &str,
        status: JobStatus,
        step: Option<JobStep>,
        progress: Option<u8>,
        reason: Option<&str>,
    ) -> Result<Value, Error> {
        let update = JobUpdate {
            job_id: job_id.to_owned(),
            status,
            step,
            progress,
            reason: reason.map(str::to_owned),
        };
        self.inner.ota_request(&update).await
    }
}
