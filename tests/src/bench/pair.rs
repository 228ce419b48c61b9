//! The two brokers under test as the scenarios use them: each run asks for a broker, and gets it restarted
//! first when it broke (antumbra's log showed a panic, or a process exited) or when the run wants a fresh
//! process. Antumbra restarts on the same data directory, so the CA, its server certificate and the devices
//! stay; Mosquitto restarts with the same configuration on a new port.

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{anyhow, Result};

use super::brokers::{Antumbra, Broker, LogLines, Mosquitto};

/// Everything needed to start either broker again.
pub struct Starter<'a> {
    pub antumbra_bin: &'a Path,
    pub mosquitto_bin: &'a Path,
    /// The run's temporary directory (holds antumbra's `data/` and Mosquitto's files).
    pub dir: &'a Path,
    pub token: &'a str,
    /// RUST_LOG for antumbra.
    pub log_filter: &'a str,
    /// antumbra's log summary, shared by every antumbra process of the run.
    pub logs: Arc<LogLines>,
    /// The CA file Mosquitto trusts.
    pub ca_file: &'a Path,
}

impl Starter<'_> {
    fn antumbra(&self) -> Result<Antumbra> {
        Antumbra::start(
            self.antumbra_bin,
            self.dir,
            self.token,
            20_000,
            self.log_filter,
            self.logs.clone(),
        )
    }

    fn mosquitto(&self) -> Result<Mosquitto> {
        let pki = self.dir.join("data/pki");
        Mosquitto::start(self.mosquitto_bin, self.dir, self.ca_file, &pki)
    }
}

/// The live brokers and what went wrong with them.
pub struct Pair<'a> {
    starter: Starter<'a>,
    /// `None` only when a restart failed.
    antumbra: RefCell<Option<Antumbra>>,
    mosquitto: RefCell<Option<Mosquitto>>,
    /// Panics already reported.
    panics_seen: Cell<usize>,
    /// antumbra broke and has not been restarted yet.
    broken: Cell<bool>,
    /// Incidents not yet printed under a table.
    pending: RefCell<Vec<String>>,
    /// Every incident of the run.
    incidents: RefCell<Vec<String>>,
}

/// How the brokers ended, for the summary.
pub struct Ending {
    pub incidents: Vec<String>,
    pub antumbra_running: bool,
    pub mosquitto_running: bool,
}

impl<'a> Pair<'a> {
    pub fn new(starter: Starter<'a>, antumbra: Antumbra, mosquitto: Mosquitto) -> Self {
        Self {
            starter,
            antumbra: RefCell::new(Some(antumbra)),
            mosquitto: RefCell::new(Some(mosquitto)),
            panics_seen: Cell::new(0),
            broken: Cell::new(false),
            pending: RefCell::new(Vec::new()),
            incidents: RefCell::new(Vec::new()),
        }
    }

    fn incident(&self, text: String) {
        eprintln!("  !! {text}");
        self.pending.borrow_mut().push(text.clone());
        self.incidents.borrow_mut().push(text);
    }

    /// Reports, once, a panic in antumbra's log or an exit, after `label`; marks it for a restart.
    pub fn check_antumbra(&self, label: &str) {
        let mut slot = self.antumbra.borrow_mut();
        let Some(antumbra) = slot.as_mut() else {
            return;
        };
        let panics = antumbra.logs.panics.load(Ordering::Relaxed);
        let running = antumbra.is_running();
        if panics <= self.panics_seen.get() && running {
            return;
        }
        self.panics_seen.set(panics);
        self.broken.set(true);
        let what = if running {
            let ready = antumbra
                .readyz()
                .map_or_else(|e| format!("error {e}"), |c| c.to_string());
            format!("a thread panicked (see its log below); the process runs on, GET /readyz answers {ready}")
        } else {
            "the process exited".into()
        };
        self.incident(format!("antumbra, during or right after {label}: {what}"));
    }

    /// Broker `index` (0 = antumbra, 1 = mosquitto) for the run `label`; restarted first when it broke, or
    /// always when `fresh`.
    pub fn broker(&self, index: usize, label: &str, fresh: bool) -> Result<Broker> {
        if index == 1 {
            let mut slot = self.mosquitto.borrow_mut();
            let exited = slot.as_mut().is_none_or(|m| !m.is_running());
            if exited {
                self.incident(format!("mosquitto was not running before {label}"));
            }
            if fresh || exited {
                drop(slot.take());
                *slot = Some(self.starter.mosquitto()?);
            }
            return Ok(slot.as_ref().map(|m| m.broker.clone()).expect("just set"));
        }
        self.check_antumbra(label);
        let broken = self.broken.replace(false) || self.antumbra.borrow().is_none();
        if broken || fresh {
            // Stop the old process before its successor opens the same data directory.
            drop(self.antumbra.borrow_mut().take());
            match self.starter.antumbra() {
                Ok(antumbra) => {
                    if broken {
                        self.incident(format!("antumbra restarted (same data directory) before {label}"));
                    }
                    *self.antumbra.borrow_mut() = Some(antumbra);
                }
                Err(e) => self.incident(format!("antumbra could not be restarted: {e:#}")),
            }
        }
        self.antumbra
            .borrow()
            .as_ref()
            .map(|a| a.broker.clone())
            .ok_or_else(|| anyhow!("antumbra is not running"))
    }

    /// Incidents since the last call, for the notes under a table.
    pub fn take_pending(&self) -> Vec<String> {
        std::mem::take(&mut *self.pending.borrow_mut())
    }

    /// Stops both brokers and says how they ended.
    pub fn finish(self) -> Ending {
        let antumbra_running = self
            .antumbra
            .borrow_mut()
            .as_mut()
            .is_some_and(|a| a.is_running());
        let mosquitto_running = self
            .mosquitto
            .borrow_mut()
            .as_mut()
            .is_some_and(|m| m.is_running());
        Ending {
            incidents: self.incidents.into_inner(),
            antumbra_running,
            mosquitto_running,
        }
    }
}
