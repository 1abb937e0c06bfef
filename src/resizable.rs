//! A semaphore whose number of permits can move at run time without taking
//! back a permit that is held: the pool of a stage (adaptive concurrency),
//! the prefetch permits of intake (a prefetch that follows the stages), the
//! simulator's capacity. A raise adds permits; a cut forgets the free ones
//! at once and the rest as they come back (a debt), so work holding a
//! permit always finishes — nothing is dropped or taken twice — and no new
//! permit is handed out until fewer than the new limit are held.
//!
//! Tokio's `Semaphore` can add and forget permits but not owe them; the
//! debt is what this adds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub struct Resizable {
    permits: Arc<Semaphore>,
    /// Permits still to forget as they come back, after a cut.
    debt: Arc<AtomicUsize>,
    limit: AtomicUsize,
}

/// One permit of a [`Resizable`]: forgotten on drop while a cut is owed.
#[derive(Debug)]
pub struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    debt: Option<Arc<AtomicUsize>>,
}

impl From<OwnedSemaphorePermit> for Permit {
    /// A permit of a plain semaphore, never part of a cut (tests).
    fn from(permit: OwnedSemaphorePermit) -> Self {
        Self {
            permit: Some(permit),
            debt: None,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(debt) = &self.debt else {
            return;
        };
        let owed = debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
            .is_ok();
        if let (true, Some(p)) = (owed, self.permit.take()) {
            p.forget();
        }
    }
}

impl Resizable {
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            debt: Arc::new(AtomicUsize::new(0)),
            limit: AtomicUsize::new(limit),
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    /// Permits free right now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// Waits for a permit; `None` once the semaphore is closed.
    pub async fn acquire(&self) -> Option<Permit> {
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        Some(self.wrap(permit))
    }

    /// A permit if one is free now.
    pub fn try_acquire(&self) -> Option<Permit> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(self.wrap(permit))
    }

    fn wrap(&self, permit: OwnedSemaphorePermit) -> Permit {
        Permit {
            permit: Some(permit),
            debt: Some(self.debt.clone()),
        }
    }

    /// Moves the limit to `new`; returns the old one.
    pub fn resize(&self, new: usize) -> usize {
        let old = self.limit.swap(new, Ordering::AcqRel);
        if new > old {
            let mut grow = new - old;
            // What is still owed is cancelled before permits are added.
            while grow > 0 {
                let owed = self.debt.load(Ordering::Acquire);
                if owed == 0 {
                    break;
                }
                let take = owed.min(grow);
                if self
                    .debt
                    .compare_exchange(owed, owed - take, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    grow -= take;
                }
            }
            self.permits.add_permits(grow);
        } else if new < old {
            let cut = old - new;
            let forgotten = self.permits.forget_permits(cut);
            self.debt.fetch_add(cut - forgotten, Ordering::AcqRel);
        }
        old
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cut_waits_for_held_permits_and_a_raise_pays_the_debt_first() {
        let r = Resizable::new(4);
        let held: Vec<Permit> = (0..4).filter_map(|_| r.try_acquire()).collect();
        assert_eq!(r.resize(2), 4);
        assert_eq!(r.available(), 0);
        drop(held);
        assert_eq!(r.available(), 2, "two forgotten as they came back");
        let a = r.try_acquire().expect("permit");
        let b = r.try_acquire().expect("permit");
        r.resize(1);
        assert_eq!(r.available(), 0, "two held, one owed");
        r.resize(3);
        assert_eq!(r.available(), 1, "the debt cancelled before adding");
        drop((a, b));
        assert_eq!(r.available(), 3, "every permit back, exactly the limit");
        assert_eq!(r.limit(), 3);
    }
}
