"""Generation engines behind the compute stage."""
