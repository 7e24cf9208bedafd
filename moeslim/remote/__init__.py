"""Hub sources read in place: shards as sparse files filled by HTTP range requests, a bounded window on disk."""
