//! smtp probe (being built).

use crate::Probe;
use crate::spec::{SpecContext, SpecError};

/// Builds the smtp probe from a spec.
pub fn build(_ctx: &SpecContext<'_>) -> Result<Box<dyn Probe>, SpecError> {
    Err(SpecError::Missing("the smtp probe is not built yet".into()))
}
