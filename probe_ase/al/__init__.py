"""Active learning: explore with gated MD, select, label with a reference code, store, retrain."""
