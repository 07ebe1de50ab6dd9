"""What export and eval measure: held-out questions, the vLLM probe hand-off, fact recall, the
checks' verdicts.

Empty on purpose: importing the package loads none of its modules."""
