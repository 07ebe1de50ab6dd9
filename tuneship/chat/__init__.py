"""Chat data: records in the formats users bring, the chat template's conventions,
assistant-only labels, the training mix.

Empty on purpose: importing the package loads none of its modules."""
