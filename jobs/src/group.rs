//! Group commit: concurrent callers hand their rows to a few writers, and
//! each write takes whatever queued while the previous one ran. At load one
//! statement (and one WAL flush) serves many callers; a lone caller waits
//! no longer than its own write. Every caller still waits for the commit
//! that holds its row, so nothing is acknowledged before it is durable.

use std::{future::Future, sync::Arc};

use tokio::sync::{Mutex, mpsc, oneshot};

type Entry<T, R> = (T, oneshot::Sender<R>);

/// A handle callers submit rows through; cheap to clone.
pub struct Group<T, R> {
    sender: mpsc::Sender<Entry<T, R>>,
}

impl<T, R> Clone for Group<T, R> {
    fn clone(&self) -> Self {
        Group {
            sender: self.sender.clone(),
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Group<T, R> {
    /// Starts `writers` writers (on the current Tokio runtime), each writing
    /// at most `max` rows at a time with `write`, which must answer one
    /// result per row, in order.
    pub fn spawn<W, F>(writers: usize, max: usize, write: W) -> Self
    where
        W: Fn(Vec<T>) -> F + Send + Sync + 'static,
        F: Future<Output = Vec<R>> + Send,
    {
        let max = max.max(1);
        let (sender, receiver) = mpsc::channel::<Entry<T, R>>(writers.max(1) * max);
        let receiver = Arc::new(Mutex::new(receiver));
        let write = Arc::new(write);
        for _ in 0..writers.max(1) {
            let (receiver, write) = (receiver.clone(), write.clone());
            tokio::spawn(async move {
                loop {
                    let mut group = Vec::new();
                    {
                        // One writer gathers at a time; the others are
                        // writing, so what queues meanwhile forms the next
                        // group.
                        let mut receiver = receiver.lock().await;
                        let Some(first) = receiver.recv().await else {
                            return;
                        };
                        group.push(first);
                        while group.len() < max {
                            match receiver.try_recv() {
                                Ok(next) => group.push(next),
                                Err(_) => break,
                            }
                        }
                    }
                    let (rows, replies): (Vec<T>, Vec<_>) = group.into_iter().unzip();
                    let results = write(rows).await;
                    debug_assert_eq!(results.len(), replies.len());
                    for (reply, result) in replies.into_iter().zip(results) {
                        // The caller may have gone (its request was dropped).
                        let _ = reply.send(result);
                    }
                }
            });
        }
        Group { sender }
    }

    /// Submits one row and waits for its result; `None` when the writers
    /// are gone (the runtime is shutting down).
    pub async fn submit(&self, row: T) -> Option<R> {
        let (reply, answer) = oneshot::channel();
        self.sender.send((row, reply)).await.ok()?;
        answer.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn each_caller_gets_its_own_result_and_rows_share_writes() {
        let writes = Arc::new(AtomicUsize::new(0));
        let counted = writes.clone();
        let group = Group::spawn(1, 64, move |rows: Vec<u32>| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                rows.into_iter().map(|r| r * 2).collect::<Vec<_>>()
            }
        });
        let callers: Vec<_> = (0..200u32)
            .map(|i| {
                let group = group.clone();
                tokio::spawn(async move { (i, group.submit(i).await) })
            })
            .collect();
        for caller in callers {
            let (i, answer) = caller.await.unwrap();
            assert_eq!(answer, Some(i * 2));
        }
        let writes = writes.load(Ordering::Relaxed);
        assert!(
            writes < 200,
            "200 rows took {writes} writes: none were grouped"
        );
    }
}
