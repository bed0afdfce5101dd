"""Scores streamed from the training backward: the scorer (a hook sink) and its results."""
