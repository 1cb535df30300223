"""The synthetic safety lab of Jain et al. (NeurIPS 2024): data, model, training, evaluation."""
