//! kombu's failover over a `;`-separated list of broker URLs, as the Redis and RabbitMQ clients
//! follow it: the hosts in kombu's default order (`round-robin`: the list as given, wrapping
//! around), a reading served by the first host that answers, and the next reading starting from
//! the host that answered last.
//!
//! kombu's `Connection` splits such a URL on `;`, keeps the first host while it works, and after a
//! connection error switches to the next one of its `itertools.cycle` over the list. A host that
//! answers with an error of its own (refused credentials, a missing queue) has answered: its
//! answer is the reading's, and no other host is asked.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::error::Error;

/// Where the next reading of a failover list starts: the host that answered last.
#[derive(Debug)]
pub struct Rotation {
    current: AtomicUsize,
    len: usize,
}

impl Rotation {
    /// A rotation over `len` hosts, starting with the first (as kombu does).
    pub fn new(len: usize) -> Self {
        Rotation {
            current: AtomicUsize::new(0),
            len: len.max(1),
        }
    }

    /// The hosts one reading tries, each once: from the host that answered last, on in the
    /// list's order, wrapping around.
    pub fn order(&self) -> impl Iterator<Item = usize> {
        let start = self.current();
        let len = self.len;
        (0..len).map(move |i| (start + i) % len)
    }

    /// The host that answered last (the first one before any reading).
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.len
    }

    /// Host `i` answered: the next reading starts from it.
    pub fn answered(&self, i: usize) {
        self.current.store(i % self.len, Ordering::Relaxed);
    }
}

/// Whether `err` means the host did not answer (unreachable, refused, cut, or silent past its
/// share of the deadline), so the next host of the list is tried.
pub fn did_not_answer(err: &Error) -> bool {
    matches!(err, Error::Unavailable(_) | Error::DeadlineExceeded(_))
}

/// How long each of `hosts` may take to connect (and, on Redis, to answer) within a reading's
/// `deadline`: an equal share, so a reading that moves on from a silent host still ends in time.
pub fn share(deadline: Duration, hosts: usize) -> Duration {
    let n = u32::try_from(hosts.max(1)).unwrap_or(u32::MAX);
    (deadline / n).max(Duration::from_millis(50))
}

/// The error of a reading that no host of a list answered: each host's error in the order
/// tried; the code is the last one's (a timeout if any host timed out, so `DEADLINE_EXCEEDED`
/// says the deadline was the limit).
pub fn none_answered(errors: Vec<Error>) -> Error {
    let timed_out = errors
        .iter()
        .any(|e| matches!(e, Error::DeadlineExceeded(_)));
    let text = errors
        .iter()
        .map(Error::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let msg = format!(
        "no host of the failover list answered ({} tried): {text}",
        errors.len()
    );
    if timed_out {
        Error::DeadlineExceeded(msg)
    } else {
        Error::Unavailable(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_from_the_host_that_answered_last() {
        let r = Rotation::new(3);
        assert_eq!(r.order().collect::<Vec<_>>(), [0, 1, 2]);
        r.answered(1);
        assert_eq!(r.order().collect::<Vec<_>>(), [1, 2, 0]);
        r.answered(2);
        assert_eq!(r.order().collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(Rotation::new(1).order().collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn only_unanswered_hosts_move_on() {
        assert!(did_not_answer(&Error::Unavailable("x".into())));
        assert!(did_not_answer(&Error::DeadlineExceeded("x".into())));
        assert!(!did_not_answer(&Error::Unauthenticated("x".into())));
        assert!(!did_not_answer(&Error::NotFound("x".into())));
        let e = none_answered(vec![
            Error::Unavailable("a refused".into()),
            Error::DeadlineExceeded("b silent".into()),
        ]);
        assert!(matches!(&e, Error::DeadlineExceeded(m) if m.contains("a refused; b silent")));
        assert_eq!(share(Duration::from_secs(2), 2), Duration::from_secs(1));
    }
}
