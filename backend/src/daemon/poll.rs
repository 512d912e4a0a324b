//! How long to watch the shared region before sleeping: a window that adapts to how soon work
//! follows, the way KVM's halt polling adapts `halt_poll_ns` (virt/kvm/kvm_main.c,
//! `kvm_vcpu_halt`): it grows while the daemon keeps being woken soon after it fell asleep (a
//! longer watch would have saved the wake-up), shrinks when it stays idle for longer than the
//! largest window (watching only burns a CPU), and stays put when the watch found the work.

use std::time::Duration;

/// Where a growing window starts (KVM's `halt_poll_ns_grow_start` default: 10 us).
pub const GROW_START: Duration = Duration::from_micros(10);

/// The window to watch the region for, between 0 and a maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptivePoll {
    max: Duration,
    current: Duration,
}

impl AdaptivePoll {
    /// A window that adapts between 0 and `max` (0: never watch). It starts at
    /// [`GROW_START`], capped at `max`.
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            current: GROW_START.min(max),
        }
    }

    /// The window to watch for now.
    pub fn window(&self) -> Duration {
        self.current
    }

    /// The largest window.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// Work arrived `idle` after the previous work ended (the watch plus the sleep). Grows or
    /// shrinks the window as KVM does for a halt of that length.
    pub fn idle_ended(&mut self, idle: Duration) {
        if idle <= self.current {
            // The watch found it (or would have): nothing to learn.
        } else if idle > self.max {
            // A long idle: watching was wasted. Halve (KVM's default shrink factor).
            self.current = self.current.checked_div(2).unwrap_or_default();
            if self.current < GROW_START {
                self.current = Duration::ZERO;
            }
        } else {
            // Woken soon after falling asleep: a longer watch would have saved the wake-up.
            self.current = self.current.saturating_mul(2).max(GROW_START).min(self.max);
        }
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn grows_while_work_comes_soon_after_each_sleep() {
        let mut p = AdaptivePoll::new(200 * US);
        assert_eq!(p.window(), 10 * US);
        // Doorbells 60 us apart: each wake-up would have been saved by a 60 us watch.
        let steps: Vec<_> = (0..5)
            .map(|_| {
                p.idle_ended(60 * US);
                p.window()
            })
            .collect();
        assert_eq!(steps, [20 * US, 40 * US, 80 * US, 80 * US, 80 * US]);
    }

    #[test]
    fn shrinks_to_zero_when_idle_outlasts_the_largest_window() {
        let mut p = AdaptivePoll::new(200 * US);
        for _ in 0..5 {
            p.idle_ended(150 * US);
        }
        assert_eq!(p.window(), 160 * US);
        p.idle_ended(Duration::from_millis(3));
        assert_eq!(p.window(), 80 * US);
        p.idle_ended(Duration::from_millis(3));
        p.idle_ended(Duration::from_millis(3));
        assert_eq!(p.window(), 20 * US);
        p.idle_ended(Duration::from_millis(3));
        assert_eq!(p.window(), 10 * US);
        p.idle_ended(Duration::from_millis(3));
        assert_eq!(p.window(), Duration::ZERO);
        // And a burst grows it again from the start.
        p.idle_ended(30 * US);
        assert_eq!(p.window(), 10 * US);
    }

    #[test]
    fn never_exceeds_the_maximum_and_zero_disables() {
        let mut p = AdaptivePoll::new(25 * US);
        for _ in 0..10 {
            p.idle_ended(24 * US);
        }
        assert_eq!(p.window(), 25 * US);
        let mut off = AdaptivePoll::new(Duration::ZERO);
        for idle in [US, 5 * US, Duration::from_millis(1)] {
            off.idle_ended(idle);
            assert_eq!(off.window(), Duration::ZERO);
        }
    }
}
