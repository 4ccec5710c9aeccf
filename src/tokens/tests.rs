//! Unit tests of the token lifecycle.
