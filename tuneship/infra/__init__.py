"""Plumbing both environments use: user-facing errors, hashing and atomic outputs, where things
are kept, starting a server, reading vLLM's output, charts.

Empty on purpose: importing the package loads none of its modules."""
