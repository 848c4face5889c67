//! ftp probe (being built).

use crate::Probe;
use crate::spec::{SpecContext, SpecError};

/// Builds the ftp probe from a spec.
pub fn build(_ctx: &SpecContext<'_>) -> Result<Box<dyn Probe>, SpecError> {
    Err(SpecError::Missing("the ftp probe is not built yet".into()))
}
