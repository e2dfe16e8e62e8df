//! Emulated devices of the ferry VMM.
