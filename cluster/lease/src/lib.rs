//! Disk-fencing leases (being built).
