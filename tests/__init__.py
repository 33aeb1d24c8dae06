"""funcam's tests: one module per source module under cuts/, core/, app/, cli/; cross-cutting properties here."""
