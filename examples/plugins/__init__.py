"""Reference plug-ins for every sluice hook; docs/customization.md shows each, tests load them by path."""
