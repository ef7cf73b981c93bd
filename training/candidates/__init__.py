"""Training candidates: each module trains one kind of model for a run and says how good it is."""
