//! http probe (being built).

use crate::Probe;
use crate::spec::{SpecContext, SpecError};

/// Builds the http probe from a spec.
pub fn build(_ctx: &SpecContext<'_>) -> Result<Box<dyn Probe>, SpecError> {
    Err(SpecError::Missing("the http probe is not built yet".into()))
}
