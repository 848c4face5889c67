//! Monitor scheduler (being built).
