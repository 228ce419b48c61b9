-- One job per device and deployment, enforced by the database. Every instance of a cluster runs the rollout
-- engine over the same deployments; when two of them start the same wave at once, the second one's inserts now
-- fail instead of giving a device a second job (or a REJECTED one, "another job in progress", beside its own).
-- Duplicates an earlier race may have left are removed first, keeping each device's earliest job.

DELETE FROM job_transitions WHERE job_id IN (
    SELECT j.id FROM jobs j WHERE EXISTS (
        SELECT 1 FROM jobs k
        WHERE k.deployment_id = j.deployment_id AND k.device_id = j.device_id
          AND (k.queued_at < j.queued_at OR (k.queued_at = j.queued_at AND k.id < j.id))
    )
);
DELETE FROM jobs WHERE EXISTS (
    SELECT 1 FROM jobs k
    WHERE k.deployment_id = jobs.deployment_id AND k.device_id = jobs.device_id
      AND (k.queued_at < jobs.queued_at OR (k.queued_at = jobs.queued_at AND k.id < jobs.id))
);
CREATE UNIQUE INDEX jobs_once_per_device ON jobs (deployment_id, device_id);
