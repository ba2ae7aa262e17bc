//! How long the Redis connections wait: shared by the command connection, the pub/sub link, the sentinel
//! lookups and the subscriber. A leaf module, so those files depend on it and not on one another.

use std::time::Duration;

/// Reconnection backoff, doubled per failure.
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long a ping or a (re)connection may take; longer than a command's timeout, because a busy but
/// healthy Redis must not make the subscription flap.
pub(super) const LINK_TIMEOUT: Duration = Duration::from_secs(2);
