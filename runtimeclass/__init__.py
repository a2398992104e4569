"""RuntimeClass definitions and the node probe that tells which runtimes really work on a node."""
