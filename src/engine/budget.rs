//! An NFE budget shared by the items of a batch or an eval arm (`--budget-nfe-mean B`):
//! the whole run may spend `items x B`, and an item that finishes under its share leaves
//! the rest to the items after it.
//!
//! Each item, when it starts, is allowed what is left after every item still to come has
//! been set aside the least one edit needs (`floor`, e.g. an adaptive edit's first wave),
//! and no more than it can use (its strategy's most); when it ends, what it did not spend
//! goes back. Items running at once hold their
//! allowances apart, so the total is never exceeded however many run concurrently; the
//! split depends on the order items start (deterministic when they run one at a time).

use std::sync::Mutex;

/// The shared budget. See the module documentation.
#[derive(Debug)]
pub struct BudgetPool {
    mean: usize,
    floor: usize,
    state: Mutex<PoolState>,
}

#[derive(Debug)]
struct PoolState {
    /// NFE not yet spent nor held by a running item.
    free: usize,
    /// Items not started yet.
    waiting: usize,
}

/// What one item may spend; hand it back to [`BudgetPool::settle`] with what was spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    /// The most this item may spend.
    pub nfe: usize,
}

impl BudgetPool {
    /// A pool of `items x mean` NFE for `items` items, each of which needs at least `floor`.
    /// Refuses a mean below the floor (the last item could not run).
    pub fn new(items: usize, mean: usize, floor: usize) -> Result<Self, String> {
        if mean < floor {
            return Err(format!(
                "a mean budget of {mean} NFE is less than one edit needs ({floor} NFE)"
            ));
        }
        Ok(Self {
            mean,
            floor,
            state: Mutex::new(PoolState {
                free: items.saturating_mul(mean),
                waiting: items,
            }),
        })
    }

    /// Starts an item that can use at most `most` NFE: it may spend that, or less when
    /// less is free beyond the floors of the items after it. Calls beyond the number of
    /// items given to [`BudgetPool::new`] get what is free.
    pub fn start_item(&self, most: usize) -> Allowance {
        let mut s = self.state.lock().expect("budget pool lock");
        s.waiting = s.waiting.saturating_sub(1);
        let reserved = s.waiting.saturating_mul(self.floor);
        let nfe = s.free.saturating_sub(reserved).min(most);
        s.free -= nfe;
        Allowance { nfe }
    }

    /// Ends an item that spent `spent` of `allowance` (more is clamped: the caller's cap
    /// is what guarantees it never happens); the rest goes back to the pool. `None` when
    /// what it spent is unknown (it failed without a report, perhaps mid-edit): all of the
    /// allowance counts as spent, so the bound holds.
    pub fn settle(&self, allowance: Allowance, spent: Option<usize>) {
        let spent = spent.unwrap_or(allowance.nfe);
        let mut s = self.state.lock().expect("budget pool lock");
        s.free += allowance.nfe.saturating_sub(spent);
    }

    /// Records an item that finished in an earlier run (resume): it spent `spent`.
    pub fn already_spent(&self, spent: usize) {
        let mut s = self.state.lock().expect("budget pool lock");
        s.waiting = s.waiting.saturating_sub(1);
        s.free = s.free.saturating_sub(spent);
    }

    /// Passes over an item this run does not own (another shard's, or a manifest line that
    /// is not an item): its share leaves the pool.
    pub fn skip_item(&self) {
        let mut s = self.state.lock().expect("budget pool lock");
        s.waiting = s.waiting.saturating_sub(1);
        s.free = s.free.saturating_sub(self.mean);
    }

    /// NFE neither spent nor held.
    pub fn free(&self) -> usize {
        self.state.lock().expect("budget pool lock").free
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn savings_of_easy_items_go_to_later_ones_and_the_total_holds() {
        // 4 items x 100, each needs at least 50.
        let pool = BudgetPool::new(4, 100, 50).unwrap();
        let a = pool.start_item(usize::MAX);
        assert_eq!(a.nfe, 400 - 3 * 50);
        pool.settle(a, Some(60)); // an easy item
        let b = pool.start_item(usize::MAX);
        assert_eq!(b.nfe, 340 - 2 * 50);
        pool.settle(b, Some(200)); // a hard one
        let c = pool.start_item(usize::MAX);
        assert_eq!(c.nfe, 140 - 50);
        pool.settle(c, Some(90));
        let d = pool.start_item(usize::MAX);
        assert_eq!(d.nfe, 50);
        pool.settle(d, Some(50));
        assert_eq!(pool.free(), 0);
        assert_eq!(60 + 200 + 90 + 50, 400);
    }

    #[test]
    fn items_running_at_once_hold_their_allowances_apart() {
        let pool = BudgetPool::new(3, 100, 50).unwrap();
        let a = pool.start_item(usize::MAX);
        let b = pool.start_item(usize::MAX);
        let c = pool.start_item(usize::MAX);
        // Whatever they spend within their allowances, the sum stays within 300.
        assert!(a.nfe + b.nfe + c.nfe <= 300);
        assert!(c.nfe >= 50, "the last item still gets its floor");
        pool.settle(b, Some(b.nfe));
        pool.settle(a, Some(a.nfe));
        pool.settle(c, Some(c.nfe));
        assert_eq!(pool.free(), 300 - a.nfe - b.nfe - c.nfe);
    }

    #[test]
    fn an_item_whose_spending_is_unknown_counts_its_whole_allowance() {
        let pool = BudgetPool::new(2, 100, 50).unwrap();
        let a = pool.start_item(120);
        assert_eq!(a.nfe, 120);
        pool.settle(a, None);
        assert_eq!(pool.free(), 80);
    }

    #[test]
    fn a_mean_below_the_floor_is_refused_and_resumed_items_count() {
        let err = BudgetPool::new(3, 40, 50).unwrap_err();
        assert!(err.contains("40 NFE") && err.contains("50 NFE"), "{err}");
        let pool = BudgetPool::new(3, 100, 50).unwrap();
        pool.already_spent(180);
        pool.skip_item();
        let next = pool.start_item(usize::MAX);
        assert_eq!(next.nfe, 20);
    }
}
