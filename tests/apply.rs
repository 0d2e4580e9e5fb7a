//! Placeholder until the applier tests land.
