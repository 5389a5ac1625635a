//! The volumes one NBD server offers, by export name.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use thinlun::Volume;

/// One export: an open volume (which also keeps it from being removed,
/// rolled back or turned into a base while served) and how it is offered.
pub struct Export {
    pub volume: Arc<Volume>,
    pub read_only: bool,
    /// Preferred I/O size to advertise (the pool's chunk).
    pub preferred_bytes: u32,
}

/// The export table, changed at run time by the daemon.
#[derive(Default)]
pub struct Exports {
    map: Mutex<BTreeMap<String, Arc<Export>>>,
}

impl Exports {
    pub fn insert(&self, name: &str, e: Export) -> Result<(), String> {
        let mut m = self.map.lock();
        if m.contains_key(name) {
            return Err(format!("'{name}' is already exported"));
        }
        m.insert(name.to_string(), Arc::new(e));
        Ok(())
    }

    /// Takes an export out of the table. Connections already attached keep
    /// their handle until they close.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        self.map.lock().remove(name)
    }

    /// The export a client asks for; the empty name means the only export,
    /// when there is one.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.resolve(name).map(|(_, e)| e)
    }

    /// [`Exports::get`], with the name the export is listed under.
    pub fn resolve(&self, name: &str) -> Option<(String, Arc<Export>)> {
        let m = self.map.lock();
        if name.is_empty() && m.len() == 1 {
            return m.iter().next().map(|(k, e)| (k.clone(), e.clone()));
        }
        m.get(name).map(|e| (name.to_string(), e.clone()))
    }

    pub fn names(&self) -> Vec<String> {
        self.map.lock().keys().cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.map.lock().is_empty()
    }
}
