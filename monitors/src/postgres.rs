//! postgres probe (being built).

use crate::Probe;
use crate::spec::{SpecContext, SpecError};

/// Builds the postgres probe from a spec.
pub fn build(_ctx: &SpecContext<'_>) -> Result<Box<dyn Probe>, SpecError> {
    Err(SpecError::Missing("the postgres probe is not built yet".into()))
}
