//! A thermostat: reports its temperature, applies the desired target the platform sets, and says so.
//!
//! ```sh
//! cargo run -p antumbra-sdk --example thermostat -- localhost 8883 thermo.crt thermo.key ca.crt
//! ```
//! Then, from another terminal, set a target and watch it arrive:
//! `curl -X PATCH $API/v1/devices/<id>/shadow -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d '{"state":{"desired":{"target":22.5}}}'`

use std::time::Duration;

use antumbra_sdk::{Config, Credentials, Device};
use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Deserialize)]
struct Desired {
    target: Option<f64>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [host, port, cert, key, ca] = args.as_slice() else {
        eprintln!("usage: thermostat HOST PORT CERT KEY CA");
        std::process::exit(2);
    };
    let credentials = Credentials::from_files(cert, key, ca)?;
    let device = Device::connect(Config::new(host.as_str(), port.parse()?, credentials))?;
    device.wait_connected(Duration::from_secs(30)).await?;
    println!("connected as {}", device.id());

    let shadow = device.shadow();
    let mut deltas = shadow.deltas();
    let mut target = 20.0_f64;
    let mut temperature = 18.0_f64;
    shadow
        .report(json!({ "temperature": temperature, "target": target }))
        .await?;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            delta = deltas.next_as::<Desired>() => match delta {
                Some(Ok((desired, version))) => {
                    if let Some(t) = desired.target {
                        target = t;
                        println!("desired target {t} (shadow version {version})");
                        shadow.report(json!({ "target": target })).await?;
                    }
                }
                Some(Err(e)) => eprintln!("ignoring a delta: {e}"),
                None => break,
            },
            _ = tick.tick() => {
                // A very simple heater: move a little towards the target.
                temperature += (target - temperature).clamp(-0.5, 0.5);
                if let Err(e) = shadow.report(json!({ "temperature": (temperature * 10.0).round() / 10.0 })).await {
                    eprintln!("report failed (will retry on the next tick): {e}");
                }
            }
        }
    }
    Ok(())
}
