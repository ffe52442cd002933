"""`edgebc serve`: the live service on the cart (settings, live pipeline, runtime, HTTP app, metrics).

Only `app` and `metrics` need the [serve] extra (FastAPI, uvicorn, prometheus-client), and they
import it lazily; the live pipeline and runtime are plain Python and numpy.
"""
