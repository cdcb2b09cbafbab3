"""Stage 3, the causal model: the factor SCM (pure numpy, no I/O), the image SCM that
joins it to a trained VAE and answers conditioning, intervention and counterfactual
queries, and the query families that measure conditioning against intervening."""
