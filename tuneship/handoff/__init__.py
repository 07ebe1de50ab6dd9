"""What one stage hands the next, typed on both sides: run.json, bundle.json, checks.json,
report.json, and reading run and bundle folders.

Empty on purpose: importing the package loads none of its modules."""
