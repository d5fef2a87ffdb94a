"""Recovery tools: archive reader, re-drive of prompts and of dead letters, restore."""
