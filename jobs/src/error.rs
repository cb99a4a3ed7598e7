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
}

impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        JobError::Transient(e.into())
    }
}
