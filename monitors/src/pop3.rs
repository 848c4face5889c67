//! pop3 probe (being built).

use crate::Probe;
use crate::spec::{SpecContext, SpecError};

/// Builds the pop3 probe from a spec.
pub fn build(_ctx: &SpecContext<'_>) -> Result<Box<dyn Probe>, SpecError> {
    Err(SpecError::Missing("the pop3 probe is not built yet".into()))
}
