"""Stage 5, evaluation: answers scored against exact ground truth (scores) through a
readout that reads an image back to its factor classes (readout)."""
