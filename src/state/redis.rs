//! Redis backend (being written): see `state/mod.rs` for the contract.
