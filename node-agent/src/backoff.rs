//! The one retry pause of the agent: worker restarts, status writes, node
//! registration and downloads all back off the same way.

use std::time::Duration;

/// Capped exponential backoff: a pause that doubles after each try, up to
/// a ceiling, and starts over once things go well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    /// Tries since the last reset.
    pub restarts: u32,
}

impl Backoff {
    /// Starts at `initial`, doubles, never exceeds `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial.min(max),
            restarts: 0,
        }
    }

    /// The pause before the next try; the one after is twice as long.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        self.restarts = self.restarts.saturating_add(1);
        delay
    }

    /// Back to the initial pause, after things went well for a while.
    pub fn reset(&mut self) {
        self.next = self.initial.min(self.max);
        self.restarts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let delays: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 5, 5]);
        assert_eq!(b.restarts, 5);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }
}
