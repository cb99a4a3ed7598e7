//! How idle queue workers look for new jobs: every interval, reliably.
//!
//! apalis' own interval strategy re-arms its timer without polling it, so a
//! fetch that completes at once leaves nothing to wake the worker until the
//! next heartbeat (30 s): jobs pushed by another process (the gateway) then
//! wait. This strategy polls the re-armed timer, so the next wake-up is
//! always registered.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use apalis::prelude::{PollSnapshot, PollStrategy};
use tokio::time::{Instant, Sleep};

/// Wakes the worker every `period`.
#[derive(Debug)]
pub struct EveryInterval {
    period: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl EveryInterval {
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            sleep: Box::pin(tokio::time::sleep(period)),
        }
    }
}

impl PollStrategy for EveryInterval {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        if self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.sleep.as_mut().reset(Instant::now() + self.period);
        // Registers this task's waker with the re-armed timer.
        let _ = self.sleep.as_mut().poll(cx);
        Poll::Ready(Some(()))
    }
}
