//! OCF monitor (being built).

use crate::Probe;
use crate::spec::{SpecContext, SpecError};

/// Builds the OCF monitor from a spec.
pub fn build(_ctx: &SpecContext<'_>, _agent: &str) -> Result<Box<dyn Probe>, SpecError> {
    Err(SpecError::Missing("the OCF monitor is not built yet".into()))
}
