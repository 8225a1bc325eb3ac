"""`make demo`: the whole system on the local stack, on drawn scenes (stages.py runs it, data.py stores them)."""
