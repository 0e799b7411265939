"""`./tb demo`: a recorded team run, replayed through the real service on a sample repository (see __main__.py)."""
