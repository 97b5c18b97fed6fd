//! Unit tests of the switch on raw rings.
