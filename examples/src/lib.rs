//! The five workloads the fleet is built for, each a program on the fleet's own primitives
//! (runs, spawns with joins, loops, early stop, checkpoints, the shared cache, rate limits,
//! breakers and fallbacks) against `taskfleet-mock-api`, measured against the figure its design
//! names. `taskfleet-examples all` runs them in turn and prints one table.

pub mod beam;
pub mod content;
pub mod document;
pub mod harness;
pub mod quorum;
pub mod research;
