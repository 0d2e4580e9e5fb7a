//! Placeholder: the hostile suite is being written (issue 9).
