"""`sluice bench ...`: benchmark scripts that print one JSON line each (never timed tests)."""
