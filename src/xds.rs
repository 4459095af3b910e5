//! Discovery over delta ADS (DESIGN §5): a placeholder filled in below.
pub mod convert;
