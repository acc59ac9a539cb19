"""One module per objective (how it masks, which head, which loss), and fine-tuning as tasks (supervised,
distillation), behind the registry in `base.py`."""
