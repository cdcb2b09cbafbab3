"""Stage 3, the causal model: the image SCM that joins the factor SCM (cvae.model.factors) to a
trained VAE and answers conditioning, intervention and counterfactual queries (image)."""
