"""Training (installed as edgebc.train): torch lives here and only here, never in the runtime."""
