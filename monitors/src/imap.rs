//! imap probe (being built).

use crate::Probe;
use crate::spec::{SpecContext, SpecError};

/// Builds the imap probe from a spec.
pub fn build(_ctx: &SpecContext<'_>) -> Result<Box<dyn Probe>, SpecError> {
    Err(SpecError::Missing("the imap probe is not built yet".into()))
}
