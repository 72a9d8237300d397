"""The captioner service (CNN encoder + LSTM decoder): its declaration, predictors and trainer land with issue 9."""
