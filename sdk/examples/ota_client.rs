//! An OTA client: reports the firmware it runs, takes jobs, "downloads" and "installs" them with progress
//! reports, then reports the new version and success. A job for a version named in `FAIL_VERSION` fails, to
//! try the platform's failure threshold.
//!
//! ```sh
//! cargo run -p antumbra-sdk --example ota_client -- localhost 8883 dev.crt dev.key ca.crt 1.0.0
//! ```

use std::time::Duration;

use antumbra_sdk::{Config, Credentials, Device, JobStatus, JobStep};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [host, port, cert, key, ca, running] = args.as_slice() else {
        eprintln!("usage: ota_client HOST PORT CERT KEY CA RUNNING_VERSION");
        std::process::exit(2);
    };
    let device = Device::connect(Config::new(
        host.as_str(),
        port.parse()?,
        Credentials::from_files(cert, key, ca)?,
    ))?;
    device.wait_connected(Duration::from_secs(30)).await?;
    let ota = device.ota();
    let mut jobs = ota.jobs();
    ota.report_version(running).await?;
    println!("{} runs firmware {running}; waiting for jobs", device.id());
    let fail_version = std::env::var("FAIL_VERSION").ok();
    while let Some(job) = jobs.next().await {
        if job.status != JobStatus::Queued {
            println!("job {} is now {:?}", job.job_id, job.status);
            continue;
        }
        println!(
            "job {}: install {} from {}",
            job.job_id, job.firmware.version, job.firmware.url
        );
        for percent in [25, 50, 75, 100] {
            ota.progress(&job.job_id, JobStep::Downloading, percent).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ota.progress(&job.job_id, JobStep::Installing, 50).await?;
        if fail_version.as_deref() == Some(job.firmware.version.as_str()) {
            ota.fail(&job.job_id, "simulated flash error").await?;
            println!("job {} failed (simulated)", job.job_id);
            continue;
        }
        ota.report_version(&job.firmware.version).await?;
        let done = ota.succeed(&job.job_id).await?;
        println!("job {} is {}", job.job_id, done["status"]);
    }
    Ok(())
}
