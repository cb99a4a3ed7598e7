//! How a job failed: worth retrying, or not until something changes.

/// A job's failure, classified so the worker knows whether to retry.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Retrying may succeed: a database, Redis, SMTP or channel API hiccup.
    #[error("transient: {0:#}")]
    Transient(#[from] anyhow::Error),
    /// Retrying cannot succeed until something changes (a product mapping, a
    /// payload). The event is kept and marked with `code` so it can be re-run.
    #[error("{code}: {detail}")]
    Permanent { code: &'static str, detail: String },
}

impl JobError {
    pub fn permanent(code: &'static str, detail: impl Into<String>) -> Self {
        JobError::Permanent {
            code,
            detail: detail.into(),
        }
    }

    /// Whether retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, JobError::Permanent { .. })
    }
}

/// The stable code of a database error that no retry can get past: the
/// data itself is refused (a NUL byte, a number out of range, a key too long
/// for its index, a constraint). Anything else (a lost connection, a
/// deadlock, a server restarting) may pass on a retry.
pub fn refused_by_database(e: &sqlx::Error) -> Option<&'static str> {
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    let state = db.code()?;
    match state.get(..2)? {
        // data_exception: invalid text, numeric overflow, bad dates.
        "22" => Some("invalid_data"),
        // integrity_constraint_violation: check, not-null, foreign key.
        "23" => Some("constraint_violated"),
        // program_limit_exceeded: e.g. an index row too large.
        "54" => Some("value_too_large"),
        _ => None,
    }
}

impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        match refused_by_database(&e) {
            Some(code) => JobError::permanent(code, format!("the database refused it: {e}")),
            None => JobError::Transient(e.into()),
        }
    }
}
