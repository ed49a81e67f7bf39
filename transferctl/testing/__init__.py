"""Generated image datasets for tests, demos and benchmarks."""
