"""The demo model and the scripts that made it; its files ship as package data."""
