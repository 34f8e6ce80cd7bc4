"""Stage 6: the Ray Serve application (app.py) and the live catalog it grounds against (catalog.py)."""
