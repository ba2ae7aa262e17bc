//! The identifiers every layer shares, in one leaf module so that no layer imports another just to name
//! a member or a peer (`channel`, `forward`, `peer` and `shard` all use these; this file uses nothing).
//!
//! Type aliases rather than newtypes: they are plain indices and keys that cross the shard boundary
//! inside [`crate::shard::Command`] and [`crate::shard::Event`] values, and a newtype would change every
//! call site of the control plane for no check the compiler does not already make through the field
//! names.

/// Identifies one membership (one join) across the whole node. Assigned by the control thread, carried
/// in shard commands and events.
pub type MemberKey = u64;

/// Index of a WebRTC peer in its shard's slab ([`crate::peer::Peers`]). Meaningful on that shard only;
/// reused after the peer leaves.
pub type PeerId = usize;

/// Identifies one WebSocket connection of this node (control plane only).
pub type ConnId = u64;
