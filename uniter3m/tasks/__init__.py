"""One module per pretraining objective: how it masks, which head, which loss."""
