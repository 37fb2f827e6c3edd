//! The `audit` section: where the record of every issued certificate goes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::validate::{FieldError, Problems};

/// Where audit records go.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum AuditSink {
    /// One JSON object a line on standard output.
    #[default]
    Stdout,
    /// Appended to `audit.path` (JSON lines).
    File,
    /// No audit records.
    None,
}

/// The audit log: one JSON line per issued certificate, in every mode.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AuditConfig {
    pub sink: AuditSink,
    /// File for `sink: file` (created mode 0640 if missing, appended to).
    pub path: Option<PathBuf>,
}

impl AuditConfig {
    /// Problems, with fields relative to `audit`.
    pub fn problems(&self) -> Vec<FieldError> {
        let mut p = Problems::new();
        match (self.sink, &self.path) {
            (AuditSink::File, None) => p.push("path", "required when sink is file"),
            (AuditSink::Stdout | AuditSink::None, Some(_)) => {
                p.push("path", "only used when sink is file")
            }
            _ => {}
        }
        p.into_vec()
    }
}
