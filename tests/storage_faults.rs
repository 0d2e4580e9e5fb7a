//! Placeholder: the storage_faults suite is being written (issue 9).
