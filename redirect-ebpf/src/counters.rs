//! Per-CPU decision counters: the only per-connection observability on the hot path.

use redirect_common::Reason;

use crate::maps::COUNTERS;

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(slot) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot is only touched by this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}
