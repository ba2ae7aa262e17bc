//! Identifiers shared by the control plane and the shards. A leaf module: it imports nothing of the crate,
//! so every layer may name a member, a peer or a connection without depending on the layer that owns it.

/// Identifies one membership (one join) across the whole node. Assigned by the control thread.
pub type MemberKey = u64;

/// Index of a WebRTC peer in its shard's slab.
pub type PeerId = usize;

/// Identifies one WebSocket connection of this node.
pub type ConnId = u64;
