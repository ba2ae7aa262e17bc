//! Identity and rights: who a member is (a signed token), what it may do (its rights), and how much one
//! client may ask of the server (limits). Checked on the control thread; nothing here runs per packet.

pub mod keys;
pub mod limits;
pub mod token;

pub use limits::{Limits, TokenBucket};
pub use token::{Claims, Rights, TokenError, Verifier};
