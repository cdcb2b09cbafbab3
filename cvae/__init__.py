"""A causal VAE for dSprites on Ray: data, training, and an SCM that answers queries.

`from cvae import CausalModel` is the Python API for notebooks (cvae.serve.api); it is imported on
first use, so `import cvae` stays cheap (no torch or pyro until then).
"""
__version__ = "0.1.0"

_API = ("CausalModel", "Value")


def __getattr__(name: str):
    if name in _API:
        from cvae.serve import api  # torch and Pyro load here, on first use
        return getattr(api, name)
    raise AttributeError(f"module 'cvae' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
