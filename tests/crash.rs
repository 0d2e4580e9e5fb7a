//! Placeholder: the crash suite is being written (issue 9).
