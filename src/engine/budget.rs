//! An NFE budget shared by the items of a batch or an eval arm (`--budget-nfe-mean B`):
//! the whole run may spend `items x B`, and an item that finishes under its share leaves
//! the rest to the items after it.
//!
//! Every item is added to the pool before any starts, with what it needs: the least its
//! strategy runs with (a fixed strategy sized to B needs B, an adaptive edit its first
//! wave), or, for an item an earlier run finished, what it spent. Each item, when it
//! starts, is allowed what is left after every other item still to come has been set
//! aside what IT needs, and no more than it can use (its strategy's most); when it ends,
//! what it did not spend goes back. So an item that can use much (adaptive) never eats
//! what a later item needs, whatever the order of the items. Items running at once hold
//! their allowances apart, so the total is never exceeded however many run concurrently;
//! the split depends on the order items start (deterministic when they run one at a time).

use std::sync::Mutex;

/// The shared budget. See the module documentation.
#[derive(Debug)]
pub struct BudgetPool {
    mean: usize,
    state: Mutex<PoolState>,
}

#[derive(Debug, Default)]
struct PoolState {
    /// NFE not yet spent nor held by a running item. Signed: an item an earlier run
    /// finished may have spent more than one mean (an adaptive edit drawing on the
    /// savings of others), and the debt must count against items added after it.
    free: i64,
    /// What the items not started yet need, together.
    reserved: i64,
}

/// What one item may spend; hand it back to [`BudgetPool::settle`] with what was spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    /// The most this item may spend.
    pub nfe: usize,
}

fn signed(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl BudgetPool {
    /// An empty pool of `mean` NFE per item: add every item with [`BudgetPool::add_item`]
    /// or [`BudgetPool::add_finished`] before the first starts.
    pub fn new(mean: usize) -> Self {
        Self {
            mean,
            state: Mutex::new(PoolState::default()),
        }
    }

    /// Adds an item still to run that needs at least `need` NFE: its mean joins the pool
    /// and `need` is set aside for it until it starts. A need above the mean is set aside
    /// as the mean: no item is promised more than its own share (such an item is cut to
    /// fit, or fails, when it starts with less).
    pub fn add_item(&self, need: usize) {
        let mut s = self.state.lock().expect("budget pool lock");
        s.free += signed(self.mean);
        s.reserved += signed(need.min(self.mean));
    }

    /// Adds an item an earlier run finished (resume), having spent `spent`.
    pub fn add_finished(&self, spent: usize) {
        let mut s = self.state.lock().expect("budget pool lock");
        s.free += signed(self.mean) - signed(spent);
    }

    /// Starts an item added with `need` that can use at most `most` NFE: it may spend
    /// that, or less when less is free beyond what the other items still to come need.
    /// An item never added (the manifest changed under the run) gets what is free beyond
    /// them.
    pub fn start_item(&self, need: usize, most: usize) -> Allowance {
        let mut s = self.state.lock().expect("budget pool lock");
        s.reserved = (s.reserved - signed(need.min(self.mean))).max(0);
        let nfe = (s.free - s.reserved).clamp(0, signed(most));
        s.free -= nfe;
        Allowance {
            nfe: usize::try_from(nfe).expect("clamped to 0..=most"),
        }
    }

    /// Ends an item that spent `spent` of `allowance` (more is clamped: the caller's cap
    /// is what guarantees it never happens); the rest goes back to the pool. `None` when
    /// what it spent is unknown (it failed without a report, perhaps mid-edit): all of the
    /// allowance counts as spent, so the bound holds.
    pub fn settle(&self, allowance: Allowance, spent: Option<usize>) {
        let spent = spent.unwrap_or(allowance.nfe);
        let mut s = self.state.lock().expect("budget pool lock");
        s.free += signed(allowance.nfe.saturating_sub(spent));
    }

    /// NFE neither spent nor held (0 when earlier runs overspent).
    pub fn free(&self) -> usize {
        let free = self.state.lock().expect("budget pool lock").free;
        usize::try_from(free.max(0)).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(mean: usize, needs: &[usize]) -> BudgetPool {
        let pool = BudgetPool::new(mean);
        for &need in needs {
            pool.add_item(need);
        }
        pool
    }

    #[test]
    fn savings_of_easy_items_go_to_later_ones_and_the_total_holds() {
        // 4 items x 100, each needs at least 50.
        let pool = pool(100, &[50; 4]);
        let a = pool.start_item(50, usize::MAX);
        assert_eq!(a.nfe, 400 - 3 * 50);
        pool.settle(a, Some(60)); // an easy item
        let b = pool.start_item(50, usize::MAX);
        assert_eq!(b.nfe, 340 - 2 * 50);
        pool.settle(b, Some(200)); // a hard one
        let c = pool.start_item(50, usize::MAX);
        assert_eq!(c.nfe, 140 - 50);
        pool.settle(c, Some(90));
        let d = pool.start_item(50, usize::MAX);
        assert_eq!(d.nfe, 50);
        pool.settle(d, Some(50));
        assert_eq!(pool.free(), 0);
        assert_eq!(60 + 200 + 90 + 50, 400);
    }

    #[test]
    fn items_before_fixed_ones_leave_them_their_whole_mean() {
        // Three adaptive items (a wave needs 26, each could use 52) before seven sized to
        // the mean of 40: the adaptive ones share only what the others do not need.
        let mut needs = vec![26; 3];
        needs.extend([40; 7]);
        let pool = pool(40, &needs);
        let mut spent = 0;
        for _ in 0..3 {
            let a = pool.start_item(26, 52);
            assert!(a.nfe >= 26, "{a:?}");
            pool.settle(a, Some(a.nfe));
            spent += a.nfe;
        }
        for _ in 0..7 {
            let f = pool.start_item(40, 40);
            assert_eq!(f.nfe, 40, "a fixed item after adaptive ones keeps its mean");
            pool.settle(f, Some(40));
            spent += 40;
        }
        assert!(spent <= 10 * 40, "spent {spent}");
    }

    #[test]
    fn items_running_at_once_hold_their_allowances_apart() {
        let pool = pool(100, &[50; 3]);
        let a = pool.start_item(50, usize::MAX);
        let b = pool.start_item(50, usize::MAX);
        let c = pool.start_item(50, usize::MAX);
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
        let pool = pool(100, &[50; 2]);
        let a = pool.start_item(50, 120);
        assert_eq!(a.nfe, 120);
        pool.settle(a, None);
        assert_eq!(pool.free(), 80);
    }

    #[test]
    fn items_finished_earlier_count_wherever_they_are() {
        // Resume: the second and third items were finished (one overspent its mean); the
        // first, to redo, gets only what is left beyond the fourth's need.
        let pool = BudgetPool::new(100);
        pool.add_item(50);
        pool.add_finished(180);
        pool.add_finished(60);
        pool.add_item(50);
        let first = pool.start_item(50, usize::MAX);
        assert_eq!(first.nfe, 400 - 180 - 60 - 50);
        let last = pool.start_item(50, usize::MAX);
        assert_eq!(last.nfe, 50);
    }

    #[test]
    fn a_need_above_the_mean_is_set_aside_as_the_mean() {
        let pool = pool(40, &[50, 50]);
        let a = pool.start_item(50, usize::MAX);
        assert_eq!(a.nfe, 40);
        let b = pool.start_item(50, usize::MAX);
        assert_eq!(b.nfe, 40);
    }
}
