"""Stage 2, the model: the supervised VAE's networks, the factor SCM over its classes, its
checkpoints, data-parallel training with Ray Train, and the classes a trained model answers,
measured (networks, factors -> checkpoint -> train (report, run) -> coverage)."""
