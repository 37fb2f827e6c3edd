//! The fake API server's objects: one store for every resource type with a single
//! resourceVersion counter (like etcd's revision), the history that watches replay, and
//! compaction (what makes an old resourceVersion `410 Gone`).

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

/// One resource type's objects.
#[derive(Default)]
pub(super) struct Collection {
    /// Current objects by (namespace, name); cluster-scoped ones have namespace "".
    pub(super) current: BTreeMap<(String, String), Value>,
    /// Every change: (resourceVersion, event type, object).
    pub(super) history: Vec<(u64, &'static str, Value)>,
}

/// All objects. resourceVersion is one counter for everything, like etcd's revision.
#[derive(Default)]
pub(super) struct Store {
    /// Last resourceVersion handed out.
    pub(super) rv: u64,
    colls: HashMap<&'static str, Collection>,
    /// Changes at or below this resourceVersion are no longer retained (compaction).
    pub(super) compacted: u64,
}

impl Store {
    /// An empty store whose next resourceVersion follows `rv`.
    pub(super) fn new(rv: u64) -> Store {
        Store {
            rv,
            ..Default::default()
        }
    }

    pub(super) fn coll(&mut self, kind: &'static str) -> &mut Collection {
        self.colls.entry(kind).or_default()
    }

    fn key(obj: &Value) -> (String, String) {
        (
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            obj["metadata"]["name"].as_str().unwrap().to_string(),
        )
    }

    /// Creates or replaces; returns the stored object (with its new resourceVersion).
    pub(super) fn put(&mut self, kind: &'static str, mut obj: Value) -> (u64, &'static str, Value) {
        self.rv += 1;
        let rv = self.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("uid-{kind}-{rv}"));
        }
        let key = Self::key(&obj);
        let c = self.coll(kind);
        let ev = if c.current.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        c.current.insert(key, obj.clone());
        c.history.push((rv, ev, obj.clone()));
        (rv, ev, obj)
    }

    pub(super) fn delete(
        &mut self,
        kind: &'static str,
        ns: &str,
        name: &str,
    ) -> Option<(u64, Value)> {
        let mut obj = self
            .coll(kind)
            .current
            .remove(&(ns.to_string(), name.to_string()))?;
        self.rv += 1;
        let rv = self.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.coll(kind).history.push((rv, "DELETED", obj.clone()));
        Some((rv, obj))
    }

    pub(super) fn get(&mut self, kind: &'static str, ns: &str, name: &str) -> Option<Value> {
        self.coll(kind)
            .current
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }
}

/// (collection, resourceVersion, event type, object)
pub(super) type Change = (&'static str, u64, &'static str, Value);
