"""The command-line programs: train, evaluate, predict, summary. Each wires library
functions to flags and prints; `common` holds what they share."""
