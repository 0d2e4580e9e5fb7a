//! Placeholder: the network suite is being written (issue 9).
