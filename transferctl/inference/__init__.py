"""Using a trained run: the model loaded back, evaluate, predict, export."""
