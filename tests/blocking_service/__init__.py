"""A test service whose predictor blocks (PERCEPT_EXTRA_SERVICES): a batch that hangs, for the inference
deadline's tests."""
