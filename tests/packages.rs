//! The .deb and .rpm packages (written by the packaging work in progress).
