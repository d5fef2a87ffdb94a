"""One module per Sluice service: a pure handler plus its wiring."""
