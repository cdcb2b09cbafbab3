"""Stage 2, the model: the supervised VAE's networks, its checkpoints, and data-parallel
training with Ray Train, and the classes a trained model answers, measured
(networks -> checkpoint -> train -> coverage)."""
