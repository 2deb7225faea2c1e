//! pg_changerelay's network endpoint (placeholder; being written).
