"""Stage 5, evaluation: answers scored against exact ground truth (scores, with metrics,
checks and report), read back to their classes by cvae.data.readout; the condition/intervene
families and the official frames."""
