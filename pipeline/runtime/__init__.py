"""The stage loop every service shares: polling, offsets, batches, the breaker, dead letters."""
